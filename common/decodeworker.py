"""The hard stop behind decode's checks: every decode runs in a worker process.

The kernel holds each worker to its budgets, whatever a decoder does: an
ITIMER_PROF timer armed with limits.decode_cpu_s kills it (SIGPROF's default
action) the moment one decode has used that much CPU, and RLIMIT_AS caps its
address space at its idle size plus limits.decode_memory_bytes, so allocations
beyond the budget fail (Pillow raises MemoryError) instead of growing the host.
A wall-clock deadline in the caller catches a worker that stops answering. A
worker that dies or overruns is reaped and replaced on the next call.

Workers are plain ``python -c`` processes started on first use (never forked
from a process that runs threads) and reused; each process keeps up to
limits.decode_workers of them, so that many decodes run in parallel. The file's
bytes and the decoded pixels pass through memory shared with the worker (no
copies through the kernel); requests and replies are small JSON messages over a
Unix socket pair, never pickles: a decoder subverted by a crafted file cannot
run code in the caller.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from PIL import Image

from common.errors import ModstreamError
from common.fetch import LoadLimits
from common.loaderrors import LoadError

__all__ = ["DecoderUnavailableError", "DecoderUsage", "decode_in_worker", "decoder_usage", "stop_decoders"]

_LENGTH = struct.Struct("<Q")
_MAX_HEADER_BYTES = 64 * 1024
_KEEP_SHARED_BYTES = 48 << 20  # shared memory a worker keeps resident between decodes (a 12 MP image)
_CHUNK_BYTES = 1 << 20
_START_TIMEOUT_S = 60.0  # imports on a loaded machine; a worker starts once, then serves many decodes
_BLOCK_BYTES = 16 << 20  # Pillow's default image block
_CACHED_BLOCKS = 4
_SLACK_BYTES = (64 << 20) + _CACHED_BLOCKS * _BLOCK_BYTES  # codecs loaded on first use, stacks, cached blocks
_ENTRY = "import sys; from common.decodeworker import serve; serve(*map(int, sys.argv[1:]))"
# glibc's malloc gives each decode's buffers of a few hundred KB back to the kernel and faults them
# in again on the next decode: ~150 page faults and 0.4-0.5 ms of system CPU per 1024x768 draft
# decode, a third of what the worker costs beyond the decode itself. Below 4 MB, allocations come
# from a heap that keeps up to 16 MB free; larger ones (a big image's pixel blocks) are still
# mapped and unmapped, so the address-space budget sees them as before. An operator's own
# setting of these glibc variables wins.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 20)}
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


class DecoderUnavailableError(ModstreamError):
    """No decode worker could be started, or one answered nonsense: a fault of this host, not of an image."""


class _WorkerLost(Exception):
    """The worker was killed from outside (SIGKILL, e.g. the OOM killer) or exited: maybe not
    this image's doing, so it is tried once more on a fresh worker before `error` is final."""

    def __init__(self, error: LoadError) -> None:
        super().__init__(error.detail)
        self.error = error


class _WorkerGone(Exception):
    """The worker closed its end, or did not answer in time (timed_out)."""

    def __init__(self, why: str, timed_out: bool = False) -> None:
        super().__init__(why)
        self.timed_out = timed_out


@dataclass(frozen=True)
class DecoderUsage:
    """What the decode workers of this process have cost so far (benchmarks, tests)."""

    cpu_s: float
    """CPU seconds of every worker ever started, those that died included."""
    peak_rss_bytes: int
    """The highest peak resident memory of the workers alive or ended since the last stop_decoders(),
    as they last reported it (a worker killed mid-decode never reports that decode's peak)."""


def decode_in_worker(data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None) -> Image.Image:
    """common.decode.decode_in_process(data, limits, draft_to), run in a budgeted worker."""
    pool = _pool()
    for attempt in range(2):
        worker = pool.acquire(limits)
        try:
            return worker.decode(data, limits, draft_to)
        except _WorkerLost as lost:
            if attempt == 1:  # twice in a row: this image is what kills it
                raise lost.error from lost
        finally:
            pool.release(worker)
    raise AssertionError("unreachable")


def decoder_usage() -> DecoderUsage:
    """Asks each idle worker (a round trip each): for benchmarks and tests, not for every decode."""
    return _pool().usage()


def stop_decoders() -> None:
    """End this process's idle workers (the next decode starts fresh ones) and wait for them to exit;
    decoder_usage().peak_rss_bytes starts again from the workers started after this."""
    _pool().stop_idle()


# --- the caller's side ---------------------------------------------------------------------------


class _Worker:
    """One worker process, its socket and the shared memory that carries the image both ways:
    the file's bytes at the start, the decoded RGB pixels after input_capacity."""

    def __init__(self, limits: LoadLimits) -> None:
        self.input_capacity = -(-limits.max_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.output_capacity = limits.max_pixels * 3
        shared_fd = os.memfd_create("modstream-decode", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The worker imports this very module, wherever this process found it.
        env = {**_MALLOC_ENV, **os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, (_PROJECT_ROOT, os.environ.get("PYTHONPATH"))))}
        try:
            os.ftruncate(shared_fd, self.input_capacity + self.output_capacity)  # sparse: pages come on use
            self.shared = mmap.mmap(shared_fd, self.input_capacity + self.output_capacity)
            self.process = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, str(theirs.fileno()), str(shared_fd), str(self.input_capacity),
                 str(self.output_capacity)],
                pass_fds=(theirs.fileno(), shared_fd), stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise DecoderUnavailableError(f"cannot start a decode worker: {exc}") from exc
        finally:
            theirs.close()
            os.close(shared_fd)
        self.sock = ours
        self.alive = True
        self.cpu_s = 0.0
        self.peak_rss_bytes = 0
        try:
            self._note_usage(_read_json(self.sock, time.monotonic() + _START_TIMEOUT_S))
        except (_WorkerGone, ValueError) as exc:
            self.kill()
            raise DecoderUnavailableError(f"decode worker did not start (exit status "
                                          f"{self.process.returncode})") from exc

    def fits(self, limits: LoadLimits) -> bool:
        return limits.max_bytes <= self.input_capacity and limits.max_pixels * 3 <= self.output_capacity

    def decode(self, data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None) -> Image.Image:
        """The decoded RGB image, or LoadError; a worker that dies or hangs is reaped first."""
        # The CPU timer is the budget; this only catches a stuck worker, with room for a starved machine.
        wall_s = max(30.0, limits.decode_cpu_s * 10)
        deadline = time.monotonic() + wall_s
        request = {"draft": draft_to, "size": len(data), "limits": {
            "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "formats": limits.formats,
            "decode_cpu_s": limits.decode_cpu_s, "decode_memory_bytes": limits.decode_memory_bytes}}
        try:
            self.shared[:len(data)] = data
            _send(self.sock, json.dumps(request).encode(), deadline)
            reply = _read_json(self.sock, deadline)
            if not reply.get("ok"):
                raise LoadError(reply["reason"], str(reply["detail"]))
            width, height = (int(side) for side in reply["size"])
            if not (width > 0 and height > 0 and width * height <= limits.max_pixels):
                raise DecoderUnavailableError(f"decode worker answered an impossible size {width}x{height}")
            image = self._pixels(width, height)
        except LoadError:
            raise
        except _WorkerGone as exc:
            error = self._failure(exc.timed_out, wall_s, limits)
            if not exc.timed_out and self.process.returncode in (0, -signal.SIGKILL):
                raise _WorkerLost(error) from exc
            raise error from exc
        except BaseException:
            self.kill()  # interrupted mid-exchange, or an answer that breaks the protocol
            raise
        finally:
            self._release_pages(len(data), 0)
        self._release_pages(0, width * height * 3)
        return image

    def _pixels(self, width: int, height: int) -> Image.Image:
        """A copy of the RGB pixels the worker left in shared memory, as an image of its own."""
        start = self.input_capacity
        with memoryview(self.shared)[start:start + width * height * 3] as view:
            # Mode RGB is always copied (its layout differs from the buffer's), so nothing stays shared.
            return Image.frombuffer("RGB", (width, height), cast(bytes, view), "raw", "RGB", 0, 1)

    def _release_pages(self, input_bytes: int, output_bytes: int) -> None:
        """Give large images' pages back: shared memory otherwise stays resident at its largest use."""
        for start, used in ((0, input_bytes), (self.input_capacity, output_bytes)):
            if used > _KEEP_SHARED_BYTES and self.alive:
                self.shared.madvise(mmap.MADV_REMOVE, start, -(-used // mmap.PAGESIZE) * mmap.PAGESIZE)

    def _failure(self, timed_out: bool, wall_s: float, limits: LoadLimits) -> LoadError:
        self.kill()
        status = self.process.returncode
        if timed_out:
            return LoadError("decode_failed", f"decoding did not finish within {wall_s:g} s")
        if status == -signal.SIGPROF:
            return LoadError("too_large", f"decoding needs more than the {limits.decode_cpu_s:g} s CPU budget")
        name = signal.Signals(-status).name if status < 0 and -status in signal.valid_signals() else status
        return LoadError("decode_failed", f"the decoder crashed on this image ({name})")

    def refresh_usage(self) -> None:
        """Ask the idle worker for its CPU and peak memory (not part of every reply: reading the peak
        costs the worker more than a small decode)."""
        try:
            _send(self.sock, json.dumps({"usage": True}).encode(), time.monotonic() + _START_TIMEOUT_S)
            self._note_usage(_read_json(self.sock, time.monotonic() + _START_TIMEOUT_S))
        except (_WorkerGone, ValueError):
            self.kill()

    def _note_usage(self, reply: dict[str, Any]) -> None:
        self.cpu_s = float(reply.get("cpu_s", self.cpu_s))
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(reply.get("peak_rss_bytes", 0)))

    def kill(self) -> None:
        """Stop the worker now and reap it, keeping its final CPU and memory figures."""
        if not self.alive:
            return
        self.alive = False
        self.sock.close()
        self.shared.close()
        if self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGKILL)  # unreaped, so the pid is still ours even if it exited
            self._reap()

    def exited(self) -> bool:
        """Whether the process is gone (reaped now if so), without waiting."""
        if self.process.returncode is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.process.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def close(self) -> None:
        """Let an idle worker exit on its own (it sees end of file) and reap it."""
        if self.alive:
            self.alive = False
            self.sock.close()
            self.shared.close()
            if self.process.returncode is None:
                self._reap()

    def _reap(self) -> None:
        """Wait for the worker to exit and keep its status and final CPU (os.wait4: Popen drops the
        usage). Its peak memory stays the last one it reported: the kernel's ru_maxrss of a child
        starts at its parent's, so it says nothing about the worker."""
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime


class _Pool:
    """This process's workers: reused, at most `most` at a time, replaced when they die."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._starting = 0
        self._retired_cpu_s = 0.0
        self._retired_peak_rss = 0

    def acquire(self, limits: LoadLimits) -> _Worker:
        with self._changed:
            while not self._idle and len(self._live) + self._starting >= limits.decode_workers:
                self._changed.wait()
            if self._idle:
                worker = self._idle.pop()
                if worker.fits(limits) and not worker.exited():
                    return worker
                replaced = worker  # died while idle (killed from outside), or its shared memory is too small
            else:
                replaced = None
            self._starting += 1
        if replaced is not None:
            replaced.close()
            with self._changed:
                self._retire(replaced)
        try:
            worker = _Worker(limits)
        finally:
            with self._changed:
                self._starting -= 1
                self._changed.notify()
        with self._changed:
            self._live.add(worker)
        return worker

    def release(self, worker: _Worker) -> None:
        with self._changed:
            if worker.alive:
                self._idle.append(worker)
            else:
                self._retire(worker)
            self._changed.notify()

    def stop_idle(self) -> None:
        with self._changed:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()
        with self._changed:
            for worker in idle:
                self._retire(worker)
            self._retired_peak_rss = 0
            self._changed.notify_all()

    def _retire(self, worker: _Worker) -> None:
        self._live.discard(worker)
        self._retired_cpu_s += worker.cpu_s
        self._retired_peak_rss = max(self._retired_peak_rss, worker.peak_rss_bytes)

    def usage(self) -> DecoderUsage:
        with self._changed:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.refresh_usage()
        with self._changed:
            for worker in idle:
                if worker.alive:
                    self._idle.append(worker)
                else:
                    self._retire(worker)
            self._changed.notify_all()
            return DecoderUsage(self._retired_cpu_s + sum(worker.cpu_s for worker in self._live),
                                max([self._retired_peak_rss, *(worker.peak_rss_bytes for worker in self._live)]))


_POOLS: dict[int, _Pool] = {}
_POOLS_LOCK = threading.Lock()


def _pool() -> _Pool:
    """The pool of this process: a forked child starts its own rather than share its parent's sockets."""
    with _POOLS_LOCK:
        pid = os.getpid()
        if pid not in _POOLS:
            _POOLS.clear()
            _POOLS[pid] = _Pool()
        return _POOLS[pid]


# --- framing: 8-byte length, then the bytes ------------------------------------------------------


def _send(sock: socket.socket, payload: bytes, deadline: float) -> None:
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(_LENGTH.pack(len(payload)))
        sock.sendall(payload)
    except TimeoutError as exc:  # a worker that stopped reading
        raise _WorkerGone("timed out", timed_out=True) from exc
    except OSError as exc:
        raise _WorkerGone(str(exc)) from exc


def _receive(sock: socket.socket, deadline: float | None, most: int) -> bytearray:
    """One message of at most `most` bytes."""
    length = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size, deadline))[0]
    if length > most:
        raise _WorkerGone(f"message of {length} bytes")
    return _receive_exactly(sock, length, deadline)


def _receive_exactly(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    try:
        # None: wait as long as it takes (a worker waiting for its next request, however idle).
        sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        while received < size:
            if deadline is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
            count = sock.recv_into(view[received:])
            if count == 0:
                raise _WorkerGone("end of file")
            received += count
    except TimeoutError as exc:
        raise _WorkerGone("timed out", timed_out=True) from exc
    except OSError as exc:
        raise _WorkerGone(str(exc)) from exc
    return buffer


def _read_json(sock: socket.socket, deadline: float | None) -> dict[str, Any]:
    value = json.loads(_receive(sock, deadline, most=_MAX_HEADER_BYTES))
    if not isinstance(value, dict):
        raise ValueError("a worker header is a JSON object")
    return value


# --- the worker's side ---------------------------------------------------------------------------


def serve(fd: int, shared_fd: int, input_capacity: int, output_capacity: int) -> None:
    """The worker's loop: decode each request under the budgets it names, until the caller hangs up."""
    import common.decode  # noqa: F401 - Pillow and its codecs, loaded before the idle size is taken

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash on a crafted file leaves no core dump behind
    sock = socket.socket(fileno=fd)
    shared = mmap.mmap(shared_fd, input_capacity + output_capacity)
    os.close(shared_fd)
    Image.init()
    # Keep a few freed image blocks for the next decode instead of faulting in fresh pages each time
    # (measured: a quarter of the decode's CPU on 1024x768 drafts). Their room is in _SLACK_BYTES.
    Image.core.set_blocks_max(_CACHED_BLOCKS)
    Image.core.set_block_size(_BLOCK_BYTES)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    idle_bytes = _address_space_bytes()  # the shared memory's mapping included
    _send_json(sock, _usage())
    while True:
        try:
            request = json.loads(_receive(sock, None, most=_MAX_HEADER_BYTES))
        except _WorkerGone:
            return
        if "usage" in request:
            reply = _usage()
        else:
            reply = _decode_request(request, shared, input_capacity, output_capacity, idle_bytes, hard)
        try:
            _send_json(sock, reply)
        except _WorkerGone:  # the caller went away mid-decode
            return


def _decode_request(request: dict[str, Any], shared: mmap.mmap, input_capacity: int, output_capacity: int,
                    idle_bytes: int, hard: int) -> dict[str, Any]:
    """Decode the image in shared memory under the request's budgets; the pixels go back there."""
    from common.decode import decode_in_process

    limits = LoadLimits(**request["limits"])
    draft = (int(request["draft"][0]), int(request["draft"][1])) if request["draft"] else None
    cap = idle_bytes + limits.decode_memory_bytes + _SLACK_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.setitimer(signal.ITIMER_PROF, limits.decode_cpu_s)
    try:
        image = decode_in_process(shared[:min(request["size"], input_capacity)], limits, draft)
        if image.width * image.height * 3 > output_capacity:
            raise LoadError("too_large", f"{image.width}x{image.height} pixels, limit {limits.max_pixels}")
        _write_rgb(image, shared, input_capacity)
        return {"ok": True, "size": image.size}
    except LoadError as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _write_rgb(image: Image.Image, shared: mmap.mmap, offset: int) -> None:
    """Pack the pixels straight into shared memory, a chunk at a time, as tobytes() does: tobytes()
    would then join the chunks into one bytes object, faulting in fresh pages for each large image."""
    encoder = Image._getencoder("RGB", "raw", "RGB")
    try:
        encoder.setimage(image.im, (0, 0, *image.size))
        status = 0
        while status == 0:
            _, status, chunk = encoder.encode(max(_CHUNK_BYTES, image.width * 4))
            shared[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
        if status < 0:
            raise LoadError("decode_failed", f"cannot pack the decoded pixels (encoder error {status})")
    finally:
        encoder.cleanup()


def _send_json(sock: socket.socket, value: dict[str, Any]) -> None:
    _send(sock, json.dumps(value).encode(), time.monotonic() + _START_TIMEOUT_S)


def _usage() -> dict[str, Any]:
    """CPU so far, and the resident high-water mark of this process image: VmHWM, not ru_maxrss,
    which starts at the RSS of the process that spawned us."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as status:
        peak_kib = next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak_kib * 1024}


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
