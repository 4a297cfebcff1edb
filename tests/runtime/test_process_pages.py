"""The code pages only start-up ran, out of RSS once serving has begun: which mappings count, that a
page written in a private mapping is never dropped, and a server that drops them answering the same."""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys

import pytest
from loraplex.runtime.client import Client
from loraplex.runtime.engines.process_pages import PAGE, code_mappings, drop_clean_pages, entries, file_pages

from tests.fixtures.serving import ENGINES, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")

MAPS = """\
7f0000000000-7f0000002000 r--p 00000000 08:01 11 /usr/lib/libort.so
7f0000002000-7f0000008000 r-xp 00002000 08:01 11 /usr/lib/libort.so
7f0000008000-7f0000009000 r--p 00008000 08:01 11 /usr/lib/libort.so
7f0000009000-7f000000a000 rw-p 00009000 08:01 11 /usr/lib/libort.so
7f1000000000-7f1000100000 r--p 00000000 08:01 12 /srv/model.data
7f2000000000-7f2000001000 r-xs 00000000 08:01 13 /dev/shm/shared code
7f3000000000-7f3000001000 r-xp 00000000 08:01 14 /usr/lib/gone.so (deleted)
7f4000000000-7f4000001000 r-xp 00000000 00:00 0 [vdso]
7f5000000000-7f5000021000 rw-p 00000000 00:00 0
"""


def test_code_mappings_are_the_read_only_private_mappings_of_files_also_mapped_executable():
    assert code_mappings(MAPS) == [(0x7F0000000000, 0x7F0000002000), (0x7F0000002000, 0x7F0000008000),
                                   (0x7F0000008000, 0x7F0000009000)]


def test_clean_file_pages_are_dropped_and_a_page_written_in_a_private_mapping_is_kept(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (4 * PAGE // 256))
    with open(path, "rb") as f, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        mapping = mmap.mmap(f.fileno(), 4 * PAGE, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, writable
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        assert [mapping[i * PAGE + 1] for i in (0, 1, 3)] == [1, 1, 1]  # pages 0, 1 and 3 read: file pages
        mapping[2 * PAGE] = 7  # page 2 written: an anonymous copy, which holds what the file does not
        assert file_pages(entries(pagemap, address, 4 * PAGE)).tolist() == [True, True, False, True]

        assert drop_clean_pages([(address, address + 4 * PAGE)]) == 3 * PAGE
        present = entries(pagemap, address, 4 * PAGE) >> 63
        assert present.tolist() == [0, 0, 1, 0]
        assert mapping[2 * PAGE] == 7 and mapping[2 * PAGE + 1] == 1  # the written page kept its bytes
        assert mapping[3 * PAGE + 5] == 5  # a dropped page reads the file's bytes again
        del address
        mapping.close()


START_UP_DROP = """
import numpy as np, onnxruntime
from loraplex.runtime.engines import process_pages as pages

def code_rss():
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        return sum(int(pages.file_pages(pages.entries(pagemap, s, e - s)).sum()) for s, e in
                   pages.code_mappings(maps.read())) * pages.PAGE

before = code_rss()
dropped = pages.drop_start_up_code()
after = code_rss()
again = pages.drop_start_up_code()
print(before, dropped, after, again, pages.start_up_dropped, int(np.arange(5).sum()),
      "CPUExecutionProvider" in onnxruntime.get_available_providers())
"""


def test_the_start_up_drop_runs_once_and_the_process_runs_on():
    """In a fresh process (the drop is once per process): the libraries' resident code shrinks by what
    was dropped (a little comes back as this process runs on), a second call drops nothing, and the
    libraries still work."""
    out = subprocess.run([sys.executable, "-c", START_UP_DROP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, dropped, after, again, recorded, total, cpu = out.stdout.split()
    assert int(dropped) > 4 * 2**20 and int(dropped) == int(recorded)
    assert int(after) < int(before) - int(dropped) // 2
    assert (int(again), int(total), cpu) == (0, 10, "True")


# `loraplex serve` that answers each line on its stdin with the bytes its start-up drop dropped ("None" before).
REPORTING_SERVE = """
import sys, threading

def report():
    from loraplex.runtime.engines import process_pages
    for _ in sys.stdin:
        print("start-up code dropped:", process_pages.start_up_dropped, flush=True)

threading.Thread(target=report, daemon=True).start()
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_server_drops_its_start_up_code_once_idle_and_answers_the_same_after(recipe_package, engine):
    process = subprocess.Popen(
        [sys.executable, "-c", REPORTING_SERVE, "serve", "--package", str(recipe_package), "--port", "0",
         "--engine", engine], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def dropped() -> int | None:
        process.stdin.write("?\n")
        process.stdin.flush()
        line = process.stdout.readline()
        assert line.startswith("start-up code dropped: "), line + process.stderr.read()
        value = line.split()[-1]
        return None if value == "None" else int(value)

    try:
        serving = process.stdout.readline()
        assert serving.startswith("loraplex serving on "), serving + process.stderr.read()
        with Client(serving.split()[-1], timeout=60) as client:
            first = client.generate("alpha", "hello", max_new_tokens=6, ignore_eos=True).token_ids
            wait_until(lambda: dropped() is not None, timeout=60, what="the idle engine's start-up drop")
            assert dropped() > 2**20
            assert client.generate("alpha", "hello", max_new_tokens=6, ignore_eos=True).token_ids == first
    finally:
        process.terminate()
        process.wait(30)
