"""The data path as named stages: loader (read + convert) -> templates -> tokenize (mask labels)."""
