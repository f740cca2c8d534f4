"""Publishing under races: foreign writers' temps survive, overwrite never leaves DST missing, pods share a cache."""

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_hub import ROOT, assert_same_outputs, save_torch

import flax_data2vec as fd
from flax_data2vec import checkpoint, hub, publish

RACE_ROUNDS = 3
LOADERS = 3


pytestmark = pytest.mark.usefixtures("private_cache")




def test_live_or_young_temps_are_kept_dead_old_ones_removed(tmp_path):
    dst = str(tmp_path / "out")
    long_ago = time.time() - 2 * publish.STALE_AFTER_S
    live = f"{dst}.tmp-otherhost-1-aaaaaaaa"  # another host's writer: same PID as ours would mean nothing
    os.makedirs(live)
    Path(f"{dst}.lock-otherhost-1-aaaaaaaa").touch()
    holder = os.open(f"{dst}.lock-otherhost-1-aaaaaaaa", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # it holds its lock: alive, however old its files look
    young = f"{dst}.tmp-{os.getpid()}"  # an older version's name with our own PID, seconds old: kept
    os.makedirs(young)
    dead = f"{dst}.tmp-deadhost-7-bbbbbbbb"
    os.makedirs(dead)
    Path(f"{dst}.lock-deadhost-7-bbbbbbbb").touch()
    for p in (live, dead, f"{dst}.lock-otherhost-1-aaaaaaaa", f"{dst}.lock-deadhost-7-bbbbbbbb"):
        os.utime(p, (long_ago, long_ago))
    with publish.atomic_directory(dst) as tmp:
        Path(tmp, "whole").write_text("x")
    os.close(holder)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["out", os.path.basename(live), os.path.basename(young), "out.lock-otherhost-1-aaaaaaaa"])
    assert publish.remove_stale_writes(dst) == ["otherhost-1-aaaaaaaa"]  # its lock is free now and it is old


def test_overwrite_never_leaves_dst_missing(tmp_path):
    dst = str(tmp_path / "out")
    with publish.atomic_directory(dst) as tmp:
        Path(tmp, "v").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not os.path.isfile(os.path.join(dst, "v")):
                missing.append(time.time())

    def write(i):
        for _ in range(30):
            with publish.atomic_directory(dst, overwrite=True) as tmp:
                Path(tmp, "v").write_text(str(i))
    watcher = threading.Thread(target=watch)
    watcher.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in (1, 2)]  # two overwriters at once: both succeed
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    watcher.join()
    assert missing == []
    assert sorted(os.listdir(tmp_path)) == ["out"] and Path(dst, "v").read_text() in ("1", "2")


def test_interrupted_fallback_swap_is_repaired(tmp_path):
    """Killed between moving the old dst aside and moving the new one in (filesystems without RENAME_EXCHANGE)."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "whole").write_text("x")
    os.replace(dst, tmp_path / "out.old-deadhost-9-cccccccc")
    long_ago = time.time() - 2 * publish.STALE_AFTER_S
    os.utime(tmp_path / "out.old-deadhost-9-cccccccc", (long_ago, long_ago))
    os.utime(tmp_path / "out.old-deadhost-9-cccccccc" / "whole", (long_ago, long_ago))
    publish.remove_stale_writes(dst)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dst) == ["whole"]


RACE = """
    import os, sys, time
    import flax_data2vec as fd
    from flax_data2vec import hub
    src, workdir, me, loaders, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    convert = hub._convert
    def counted(*a, **k):
        print("converted", flush=True)
        return convert(*a, **k)
    hub._convert = counted
    for r in range(rounds):  # a fresh cache each round; all loaders start it together (a file barrier)
        open(os.path.join(workdir, f"ready-{r}-{me}"), "w").close()
        while sum(os.path.exists(os.path.join(workdir, f"ready-{r}-{i}")) for i in range(loaders)) < loaders:
            time.sleep(0.01)
        os.environ[hub.CACHE_ENV] = os.path.join(workdir, f"cache{r}")
        fd.load(src)
    print("loaded", flush=True)
"""


def test_concurrent_first_loads_from_separate_pid_namespaces(tmp_path, audio_model):
    """Every loader is PID 1 of its own namespace (as containers on a pod are): none deletes another's temp."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False)
    prefix = ["unshare", "--pid", "--fork"] if probe.returncode == 0 else []  # else: same PID namespace, still racing
    src = save_torch(audio_model, tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([*prefix, sys.executable, "-c", textwrap.dedent(RACE), src, str(tmp_path), str(i),
                               str(LOADERS), str(RACE_ROUNDS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(LOADERS)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and "loaded" in o[0] for p, o in zip(procs, outs)), [o[1][-2000:] for o in outs]
    assert sum(o[0].count("converted") for o in outs) == RACE_ROUNDS  # per round, one converted and the rest waited
    for r in range(RACE_ROUNDS):
        cache = tmp_path / f"cache{r}"
        entries = [n for n in os.listdir(cache) if not n.startswith(".")]
        assert len(entries) == 1 and checkpoint.is_checkpoint(cache / entries[0]), entries
        os.environ[hub.CACHE_ENV] = str(cache)
        module, params = fd.load(src)  # loadable every time: every file the marker names, checksums included
        assert_same_outputs(audio_model, module, params)


def _tmpfs(path: Path, size: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): the disk-full test needs one")


def test_disk_full_during_conversion_gives_one_line_and_no_temp_dir(tmp_path, audio_model):
    """First caught by the free-space check; then, with that check off, by Orbax failing mid-write."""
    src = save_torch(audio_model, tmp_path / "ckpt")
    disk = tmp_path / "disk"
    _tmpfs(disk, "64k")
    try:
        code = f"""
            import os, sys
            sys.path.insert(0, {os.path.join(ROOT, "convert")!r})
            from flax_data2vec import publish
            import pytorch_to_orbax
            argv = [{src!r}, {str(disk / "out")!r}]
            first = pytorch_to_orbax.main(argv)
            left = os.listdir({str(disk)!r})
            publish.check_free_space = lambda *a: None  # let the write start: the disk fills up under Orbax
            pytorch_to_orbax.exit_with(first + pytorch_to_orbax.main(argv) + 10 * len(left))
        """
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=300, check=False)
        assert proc.returncode == 2, proc.stderr  # both failed, and the first left nothing
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 2, proc.stderr
        assert lines[0].startswith(f"error: no space left on device for {disk / 'out'}: it needs about ")
        assert lines[1] == f"error: no space left on device while writing {disk / 'out'}; nothing was written"
        assert os.listdir(disk) == []  # no temp dir, no lock file, no half checkpoint
    finally:
        subprocess.run(["umount", str(disk)], check=False)
