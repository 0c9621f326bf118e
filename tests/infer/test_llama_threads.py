"""llama.cpp's thread count: one per physical core the process may use, not llama-cpp-python's guess."""

from pathlib import Path

from lorakit.infer.gguf import llama_threads, physical_cores


def _topology(root: Path, cpu: int, package: int, core: int) -> None:
    t = root / f"cpu{cpu}" / "topology"
    t.mkdir(parents=True)
    (t / "physical_package_id").write_text(f"{package}\n")
    (t / "core_id").write_text(f"{core}\n")


def test_no_smt_every_cpu_is_a_core(tmp_path):
    for cpu in range(4):
        _topology(tmp_path, cpu, 0, cpu)
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 4
    assert physical_cores({1, 3}, tmp_path) == 2  # the affinity, not the whole machine


def test_smt_siblings_count_once(tmp_path):
    # two hardware threads per core (cpu N and N+4 share a core), two packages with the same core ids
    for cpu in range(8):
        _topology(tmp_path, cpu, 0, cpu % 4)
    assert physical_cores(set(range(8)), tmp_path) == 4
    for cpu in range(8, 12):
        _topology(tmp_path, cpu, 1, cpu % 4)
    assert physical_cores(set(range(12)), tmp_path) == 8


def test_unreadable_topology_falls_back_to_half_the_cpus(tmp_path):
    assert physical_cores({0, 1, 2, 3}, tmp_path / "missing") == 2
    assert physical_cores({0}, tmp_path / "missing") == 1


def test_llama_threads_uses_this_machines_cores():
    n = physical_cores()
    assert n >= 1
    assert llama_threads() == {"n_threads": n, "n_threads_batch": n}
