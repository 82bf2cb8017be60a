"""Tools the assistant calls from inside its token stream: calculator, sandboxed python, search.

Every tool is a function `str -> str`. The sampling engine sees a tool-call start token (see
`TOOL_TOKENS`), collects the tokens up to the matching end token, decodes them, calls
`run_tool(name, text)` and force-feeds the answer between <|output_start|> and <|output_end|>
(rendering lives in `core.chat.render_tool_output`). `run_tool` never raises: every failure
becomes a line of text starting with "error:" that the model can read and react to.

- calculator: arithmetic over an AST whitelist (no `eval`), big integers, bounded sizes.
- python: code runs in a separate, throwaway, resource-limited process (see `SandboxConfig`).
- search: BM25 over passages of a document collection handed in by the caller (core never
  imports data/; experiments pass the synthetic encyclopedia).

Python sandbox layers (defence in depth; the tests run every attack under each layer alone):
1. Operating system: bubblewrap (`bwrap`, Debian package `bubblewrap`), run unprivileged. New
   user, PID, network, mount, IPC, UTS and cgroup namespaces; nested user namespaces disabled;
   the child sees a root of its own holding only the interpreter, its standard library and the
   C libraries, read-only (site-packages hidden), a /proc of its own processes, a minimal /dev,
   and a size-capped tmpfs scratch directory as its only writable place: nothing it writes
   outlives the run, and when the run ends the PID namespace takes every process with it.
2. A system-call filter (seccomp-BPF, written out in `seccomp_program`, no libseccomp): no new
   processes (threads allowed), sockets, namespaces, mounts, FIFOs or device nodes, ptrace or
   reading other processes' memory, kernel modules, bpf, io_uring, keyrings; signals only to
   itself.
3. An audit hook in the child (`sys.addaudithook`): refuses process creation, sockets, ctypes,
   imports whose any dotted component is denied, fresh copies of builtin modules and native
   extensions from outside the standard library, writes outside the scratch directory, reads
   and listings outside it and the standard library, sqlite `file:` URIs, and the introspection
   that could reach the hook's own state. Audit hooks are not a security boundary on their own
   (CPython says so); here they are the third layer and a source of clear error messages.
Always: resource limits (CPU seconds, address space, file size, open files, no core dumps,
RLIMIT_NPROC=1 so no new process or thread), a wall-clock deadline, a bounded output reader, an
environment of PATH, HOME, TMPDIR, LANG only, `python -I -S -B`, and never root: a root caller
runs the code (bubblewrap included) under a fresh, otherwise unused uid, and kills every
process of that uid and removes its files from the shared world-writable directories when the
run ends. Without the operating-system layer (`isolate=False`, or no bubblewrap) the sandbox
refuses to run unless `SandboxConfig(allow_unisolated=True)` asks for it explicitly.

Why bubblewrap rather than extending the hand-written namespace code this module had: the
properties wanted (a root of its own with a read-only runtime, a PID namespace whose end kills
every process, no path to the host's files, working without root) are exactly what bubblewrap
does, in C, maintained and audited for Flatpak, in Debian's main archive, and without setuid
when unprivileged user namespaces exist. Rewriting mount/pivot_root setup here would duplicate
it with less review. nsjail does more (cgroups, its own seccomp language) but is not packaged by
Debian 12, so a fresh machine could not install it with apt. The seccomp filter stays ours:
bubblewrap only loads a compiled filter, and the filter must also guard the unisolated mode.
A root caller's interpreter under a private directory (pyenv under /root, mode 700) cannot be
reached by the throwaway uid: it is hard-linked (or copied) once, without site-packages, into
RUNTIME_CACHE (/var/cache/zipchat-sandbox, root-owned) and bound from there.
The child runs `python -I -S -B`: the standard library is available, third-party packages are not.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import math
import operator
import os
import re
import secrets
import selectors
import shutil
import signal
import stat as stat_mod
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, Sequence

# ----------------------------------------------------------------------------------------------
# Tool names and their tokens: declared once in core/chat.py (the tool protocol), re-exported
# here for callers that think of them as tools' (ids come from the tokenizer).
from core.chat import (END_TOKEN_TO_TOOL, OUTPUT_END, OUTPUT_START, START_TOKEN_TO_TOOL,  # noqa: F401
                       TOOL_NAMES, TOOL_TOKENS)

# ----------------------------------------------------------------------------------------------
# Calculator


class CalculatorError(ValueError):
    """A refused or failed calculation; the message is meant for the model to read."""


@dataclasses.dataclass(frozen=True)
class CalculatorConfig:
    """Bounds on what the calculator accepts.

    Attributes:
      max_chars: longest expression accepted.
      max_nodes: most syntax-tree nodes accepted (bounds the work per expression).
      max_result_digits: most decimal digits of any integer, intermediate results included.
    """

    max_chars: int = 500
    max_nodes: int = 200
    max_result_digits: int = 1000


_BINARY_OPS: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Symbols models (and people) write for arithmetic that Python spells differently.
_SYMBOL_FIXES = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-"})


def _refusal(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"names are not allowed ({node.id!r}); write numbers only"
    if isinstance(node, ast.Attribute):
        return "attribute access is not allowed"
    if isinstance(node, ast.Call):
        return "function calls are not allowed; use + - * / // % ** and parentheses"
    if isinstance(node, ast.Tuple):
        return "commas are not allowed (write 1234, not 1,234)"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "'^' is not a power here; use ** (2**10)"
    if isinstance(node, ast.BinOp):
        return f"operator {type(node.op).__name__} is not allowed"
    if isinstance(node, ast.Constant):
        return f"only int and float numbers are allowed, got {type(node.value).__name__}"
    return f"unsupported syntax: {type(node).__name__}"


def calculate(expression: str, config: CalculatorConfig = CalculatorConfig()) -> int | float:
    """Evaluates an arithmetic expression over ints and floats without `eval`.

    Allowed: int and float literals, unary + -, binary + - * / // % **, parentheses. Integers are
    exact and arbitrarily big up to `config.max_result_digits` digits; a power or product that
    would exceed that is refused before it is computed.

    Args:
      expression: e.g. "(3 + 4) * 2**10". A trailing "=" and the symbols x-sign, divide-sign and
        minus-sign are accepted.
      config: bounds.
    Returns:
      The value (int or float).
    Raises:
      CalculatorError: refused syntax, a bound exceeded, division by zero, overflow.
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"expected a string expression, got {type(expression).__name__}")
    text = expression.translate(_SYMBOL_FIXES).strip().rstrip("=").strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > config.max_chars:
        raise CalculatorError(f"expression too long ({len(text)} > {config.max_chars} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        msg = e.msg if isinstance(e, SyntaxError) else str(e)
        raise CalculatorError(f"invalid expression: {msg}") from None
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > config.max_nodes:
        raise CalculatorError(f"expression too complex ({n_nodes} > {config.max_nodes} syntax nodes)")
    max_bits = math.ceil(config.max_result_digits * math.log2(10))
    try:
        return _eval_node(tree.body, max_bits, config.max_result_digits)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large for a float") from None


def _eval_node(node: ast.AST, max_bits: int, max_digits: int) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool is an int subclass: refused on purpose
            raise CalculatorError(_refusal(node))
        return _checked(node.value, max_bits, max_digits)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval_node(node.operand, max_bits, max_digits))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _eval_node(node.left, max_bits, max_digits)
        right = _eval_node(node.right, max_bits, max_digits)
        _precheck(node.op, left, right, max_bits, max_digits)
        value = _BINARY_OPS[type(node.op)](left, right)
        if isinstance(value, complex):
            raise CalculatorError("the result is a complex number (negative base to a fractional power)")
        return _checked(value, max_bits, max_digits)
    raise CalculatorError(_refusal(node))


def _precheck(op: ast.operator, left, right, max_bits: int, max_digits: int) -> None:
    """Refuses products and powers whose integer result would exceed the bound, before computing."""
    too_big = CalculatorError(f"result too large (more than {max_digits} digits)")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > max_bits + 1:
            raise too_big
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * math.log2(abs(left)) > max_bits + 1:
            raise too_big
    if isinstance(op, ast.Pow) and isinstance(left, float) and isinstance(right, int) and abs(right) > 10**9:
        if abs(left) not in (0.0, 1.0):
            raise CalculatorError("exponent too large")


def _checked(value: int | float, max_bits: int, max_digits: int) -> int | float:
    # the bit bound is the cheap filter; the exact digit count decides near the boundary
    if isinstance(value, int) and value.bit_length() > max_bits - 4 and abs(value) >= 10**max_digits:
        raise CalculatorError(f"result too large (more than {max_digits} digits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large for a float")
    return value


def format_number(value: int | float) -> str:
    """Ints exactly; floats with 15 significant digits (0.1 + 0.2 -> "0.3", 8 / 2 -> "4")."""
    if isinstance(value, int):
        return str(value)
    text = format(value, ".15g")
    return "0" if text == "-0" else text


def calculator(expression: str, config: CalculatorConfig = CalculatorConfig()) -> str:
    """The calculator tool: the value as text, or "error: ..." (never raises)."""
    try:
        return format_number(calculate(expression, config))
    except CalculatorError as e:
        return f"error: {e}"
    except Exception as e:  # defensive: the engine must never see an exception
        return f"error: calculator failed: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------
# Python sandbox


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and layers of the python sandbox.

    Attributes:
      wall_time_s: wall-clock limit; every process of the run is killed when it passes.
      cpu_time_s: RLIMIT_CPU in seconds (SIGXCPU at the limit, SIGKILL one second later).
      memory_bytes: RLIMIT_AS, the address-space cap (MemoryError inside python).
      max_output_bytes: stdout+stderr kept; past it the run is killed and output truncated.
      max_file_bytes: RLIMIT_FSIZE, the largest file the code may write.
      disk_bytes: size of the tmpfs scratch directory (operating-system layer).
      max_open_files: RLIMIT_NOFILE.
      max_code_bytes: longest program accepted.
      isolate: the operating-system layer (bubblewrap: user, PID, network, mount, IPC, UTS
        namespaces; a read-only runtime; a size-capped tmpfs scratch directory).
      seccomp: the system-call filter layer.
      audit_hook: the in-process audit hook layer.
      allow_unisolated: run model code even without the operating-system layer (`isolate=False`
        or bubblewrap missing). Off by default: without it the sandbox refuses to run. The code
        still never runs as root (a throwaway uid when the caller is root).
      max_processes: RLIMIT_NPROC for the run's uid; 1 forbids any new process or thread (the
        default). Tests raise it to show that each layer alone still kills what was started.
      python: interpreter for the child; default the current one.
      bwrap: the bubblewrap executable (a name looked up on PATH, or a path).
    """

    wall_time_s: float = 10.0
    cpu_time_s: int = 5
    memory_bytes: int = 512 * 2**20
    max_output_bytes: int = 16 * 2**10
    max_file_bytes: int = 8 * 2**20
    disk_bytes: int = 32 * 2**20
    max_open_files: int = 64
    max_code_bytes: int = 100_000
    isolate: bool = True
    seccomp: bool = True
    audit_hook: bool = True
    allow_unisolated: bool = False
    max_processes: int = 1
    python: str = sys.executable
    bwrap: str = "bwrap"

    def __post_init__(self):
        for name in ("wall_time_s", "cpu_time_s", "memory_bytes", "max_output_bytes",
                     "max_file_bytes", "disk_bytes", "max_open_files", "max_code_bytes", "max_processes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PythonResult:
    """What one sandboxed run produced.

    Attributes:
      output: stdout and stderr interleaved as written (tracebacks included), decoded as UTF-8.
      returncode: exit status (negative: killed by that signal); None when never started.
      timed_out: the wall-clock deadline passed.
      truncated: output exceeded `max_output_bytes` and the run was killed.
      layers: the layers that were active, e.g. ("bwrap", "uid", "rlimits", "seccomp", "audit_hook").
      error: a sandbox-level error line ("error: ..."), empty when the code ran to completion
        (a python exception in the code is part of `output`, not an error here).
    """

    output: str
    returncode: int | None
    timed_out: bool
    truncated: bool
    layers: tuple[str, ...]
    error: str

    @property
    def text(self) -> str:
        """The text shown to the model: output, then the sandbox error line if any."""
        if not self.error:
            return self.output
        if self.output and not self.output.endswith("\n"):
            return self.output + "\n" + self.error
        return self.output + self.error


_LAYERS_MARKER = b"\x1ezipchat-sandbox-layers "
_SCRATCH = "/scratch"  # the scratch directory's path inside the operating-system layer
# Where a root caller keeps a copy of an interpreter that its throwaway uid cannot reach (pyenv
# under /root, mode 700): root-owned, world-readable, rebuilt when the interpreter changes.
RUNTIME_CACHE = "/var/cache/zipchat-sandbox"
_RUNTIME_SKIP = ("site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter",
                 "turtledemo", "ensurepip", "lib2to3")

# ---- the system-call filter ------------------------------------------------------------------
# A classic-BPF seccomp program, written out here (no libseccomp): the process may not create
# processes (threads are allowed), sockets, namespaces, mounts, FIFOs or device nodes, trace,
# read, reprioritise or signal other processes (kill and tgkill only to itself), or load kernel code. Everything else is
# allowed; exec is allowed because it keeps every layer (the filter, rlimits, uid, namespaces).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name -> number, per architecture (asm/unistd_64.h; asm-generic/unistd.h)
    "x86_64": dict(
        fork=57, vfork=58, clone=56, clone3=435, execveat=322, socket=41, unshare=272, setns=308,
        mount=165, umount2=166, pivot_root=155, chroot=161, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, kexec_load=246, kexec_file_load=320, init_module=175,
        finit_module=313, delete_module=176, bpf=321, perf_event_open=298, keyctl=250,
        add_key=248, request_key=249, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_by_handle_at=304, name_to_handle_at=303, reboot=169,
        swapon=167, swapoff=168, syslog=103, acct=163, settimeofday=164, clock_settime=227,
        adjtimex=159, quotactl=179, iopl=172, ioperm=173, mknod=133, mknodat=259, kill=62,
        tkill=200, tgkill=234, memfd_create=319, personality=135, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434,
        pidfd_send_signal=424, pidfd_getfd=438, mount_setattr=442, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, kcmp=312, process_madvise=440, migrate_pages=256, move_pages=279,
        setpriority=141, ioprio_set=251, vhangup=153, uselib=134),
    "aarch64": dict(
        clone=220, clone3=435, execveat=281, socket=198, unshare=97, setns=268, mount=40,
        umount2=39, pivot_root=41, chroot=51, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, kexec_load=104, kexec_file_load=294, init_module=105,
        finit_module=273, delete_module=106, bpf=280, perf_event_open=241, keyctl=219,
        add_key=217, request_key=218, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_by_handle_at=265, name_to_handle_at=264, reboot=142,
        swapon=224, swapoff=225, syslog=116, acct=89, settimeofday=170, clock_settime=112,
        adjtimex=171, quotactl=60, mknodat=33, kill=129, tkill=130, tgkill=131,
        memfd_create=279, personality=92, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, pidfd_send_signal=424,
        pidfd_getfd=438, mount_setattr=442, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, kcmp=272,
        process_madvise=440, migrate_pages=238, move_pages=239, setpriority=140, ioprio_set=30,
        vhangup=58),
}
_OWN_PID = -1  # placeholder for the sandboxed process's pid, filled in by the child itself
_CLONE_THREAD = 0x00010000
_CLONE_NEW_NAMESPACES = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_EPERM, _ENOSYS = 1, 38


def seccomp_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The sandbox's seccomp filter as classic-BPF instructions (code, jt, jf, k).

    `k == _OWN_PID` marks the comparisons with the sandboxed process's own pid (kill, tgkill),
    which only the child knows; it substitutes them before loading the program.

    Args:
      machine: `os.uname().machine` of the target (default this machine's).
    Returns:
      The instructions.
    Raises:
      ValueError: no syscall table for this architecture.
    """
    machine = machine or os.uname().machine
    if machine not in _SYSCALLS:
        raise ValueError(f"no seccomp syscall table for architecture {machine!r} "
                         f"(known: {', '.join(_SYSCALLS)}); set SandboxConfig(seccomp=False)")
    nr = _SYSCALLS[machine]
    ld_w, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill_process = 0x7FFF0000, 0x80000000
    errno_ret = lambda e: 0x00050000 | e
    prog: list[tuple[int, int, int, int]] = [
        (ld_w, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, kill_process),
        (ld_w, 0, 0, 0),
    ]
    if machine == "x86_64":  # x32 syscalls (bit 30) would bypass the numbers below
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill_process)]
    # clone: threads only. A = flags (low word of args[0], little-endian).
    prog += [(jeq, 0, 5, nr["clone"]), (ld_w, 0, 0, 16),
             (jset, 2, 0, _CLONE_NEW_NAMESPACES), (jset, 0, 1, _CLONE_THREAD),
             (ret, 0, 0, allow), (ret, 0, 0, errno_ret(_EPERM))]
    # clone3 gets ENOSYS so that the C library falls back to clone (and its flag check above).
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, errno_ret(_ENOSYS))]
    # kill and tgkill: only the process itself (args[0] is the target pid / thread group).
    for name in ("kill", "tgkill"):
        prog += [(jeq, 0, 4, nr[name]), (ld_w, 0, 0, 16), (jeq, 0, 1, _OWN_PID),
                 (ret, 0, 0, allow), (ret, 0, 0, errno_ret(_EPERM)), (ld_w, 0, 0, 0)]
    denied = [n for name, n in nr.items() if name not in ("clone", "clone3", "kill", "tgkill")]
    for i, number in enumerate(denied):
        # jump to the shared EPERM return after the last comparison; fall through otherwise
        prog.append((jeq, len(denied) - i, 0, number))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, errno_ret(_EPERM))]
    assert all(jt < 256 and jf < 256 for _, jt, jf, _ in prog)
    return prog


# ---- the runtime the child sees --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Runtime:
    """Where an interpreter lives and what of it the sandbox exposes.

    Attributes:
      exe: the interpreter's path as the child runs it (inside the sandbox: the host path).
      binds: (host source, sandbox destination) read-only binds for the operating-system layer.
      hide: directories to cover with an empty tmpfs inside the sandbox (site-packages).
      unisolated_exe: interpreter path to run without the operating-system layer.
      unisolated_env: extra environment for that (LD_LIBRARY_PATH of a copied runtime).
    """

    exe: str
    binds: tuple[tuple[str, str], ...]
    hide: tuple[str, ...]
    unisolated_exe: str
    unisolated_env: tuple[tuple[str, str], ...]


_INFO_CODE = r'''
import json, os, site, sys, sysconfig
libdir = sysconfig.get_config_var("LIBDIR") or ""
soname = sysconfig.get_config_var("INSTSONAME") or ""
print(json.dumps({
    "exe": os.path.realpath(sys.executable), "prefix": os.path.realpath(sys.base_prefix),
    "stdlib": os.path.realpath(sysconfig.get_paths()["stdlib"]),
    "platstdlib": os.path.realpath(sysconfig.get_paths()["platstdlib"]),
    "libpython": os.path.realpath(os.path.join(libdir, soname)) if libdir and soname and
        os.path.exists(os.path.join(libdir, soname)) else "",
    "site": [os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]],
}))
'''


@functools.lru_cache(maxsize=8)
def _interpreter_info(python: str) -> dict:
    """Paths of an interpreter (executable, prefix, stdlib, libpython, site dirs), asked once."""
    out = subprocess.run([python, "-I", "-c", _INFO_CODE], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    if out.returncode != 0:
        raise RuntimeError(f"cannot query interpreter {python}: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def _traversable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach `path` (every ancestor o+x, the file o+r)."""
    parts = os.path.realpath(path).strip("/").split("/")
    for i in range(1, len(parts)):
        if not os.stat("/" + "/".join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def _system_lib_dirs() -> list[str]:
    """The C library's directories (merged-/usr aware): what the dynamic loader needs."""
    return [d for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
            if os.path.lexists(d)]


def _copy_runtime(info: dict) -> str:
    """A root-owned, world-readable copy of the interpreter, its libpython and its standard
    library (no site-packages, no tests), hard-linked where possible; built once per interpreter.

    Needed when the caller is root and the interpreter sits under a private directory: the
    throwaway uid that runs the code could not reach it, and the operating-system layer binds
    only what that uid can reach. Returns the copy's prefix (same layout as the original).
    """
    prefix = info["prefix"]
    st = os.stat(info["exe"])
    key = hashlib.sha256(json.dumps([info, st.st_mtime_ns, st.st_size]).encode()).hexdigest()[:16]
    os.makedirs(RUNTIME_CACHE, mode=0o755, exist_ok=True)
    cache = os.lstat(RUNTIME_CACHE)
    if cache.st_uid != 0 or cache.st_mode & 0o022 or not stat_mod.S_ISDIR(cache.st_mode):
        raise RuntimeError(f"{RUNTIME_CACHE} must be a root-owned directory writable only by root")
    os.chmod(RUNTIME_CACHE, 0o755)
    target = os.path.join(RUNTIME_CACHE, key)
    if os.path.isdir(target):
        return target
    tmp = tempfile.mkdtemp(prefix=".build-", dir=RUNTIME_CACHE)

    def place(src: str) -> None:
        dst = os.path.join(tmp, os.path.relpath(src, prefix))
        if os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns(*_RUNTIME_SKIP), dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _link_or_copy(src, dst)

    try:
        for src in {info["exe"], info["stdlib"], info["platstdlib"], info["libpython"]} - {""}:
            if not (src + "/").startswith(prefix + "/"):
                raise RuntimeError(f"{src} lies outside the interpreter prefix {prefix}")
            place(src)
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-links `src` when it is already readable (and, if executable, runnable) by others, so
    that nothing is duplicated and the original's mode is never touched; copies it otherwise."""
    mode = os.stat(src).st_mode
    executable = bool(mode & 0o100)
    if mode & 0o004 and (mode & 0o001 or not executable):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755 if executable else 0o644)


@functools.lru_cache(maxsize=8)
def _runtime(python: str, as_root: bool) -> _Runtime:
    """What the sandbox binds (operating-system layer) and runs for interpreter `python`."""
    info = _interpreter_info(python)
    prefix = info["prefix"]
    sources = [p for p in (info["exe"], info["stdlib"], info["platstdlib"], info["libpython"]) if p]
    copy = as_root and not all(_traversable_by_others(p) for p in sources)
    base = _copy_runtime(info) if copy else prefix
    moved = lambda p: os.path.join(base, os.path.relpath(p, prefix)) if copy else p
    binds: list[tuple[str, str]] = []
    for path in sorted(set(sources)):
        if any((path + "/").startswith(d + "/") for d in _system_lib_dirs()):
            continue  # bound with the system libraries below
        if not any((path + "/").startswith(dst + "/") for _, dst in binds):
            binds.append((moved(path), path))
    for d in _system_lib_dirs():
        if not os.path.islink(d):
            binds.append((d, d))
    bound = [dst for _, dst in binds]
    hide = tuple(sorted({s for s in info["site"] if os.path.isdir(s) and not copy
                         and any((s + "/").startswith(b + "/") for b in bound)}))
    env = (("LD_LIBRARY_PATH", os.path.dirname(moved(info["libpython"]))),) if copy and info["libpython"] else ()
    return _Runtime(info["exe"], tuple(binds), hide, moved(info["exe"]), env)


def _bwrap_args(bwrap: str, runtime: _Runtime, config: SandboxConfig) -> list[str]:
    """The bubblewrap command line up to the interpreter: every namespace (user, PID, network,
    mount, IPC, UTS, cgroup), the runtime read-only, site-packages hidden, /proc of the run's own
    processes, a minimal /dev, a size-capped tmpfs scratch directory, the rest of / read-only."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
    for src, dst in runtime.binds:
        args += ["--ro-bind", src, dst]
    for d in _system_lib_dirs():
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
    for d in runtime.hide:  # empty and read-only
        args += ["--size", "4096", "--tmpfs", d, "--remount-ro", d]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "0700", "--size", str(config.disk_bytes), "--tmpfs", _SCRATCH,
             "--chdir", _SCRATCH, "--remount-ro", "/dev", "--remount-ro", "/"]
    return args


# Stage 1 runs first in the child, never as root (the parent starts it under a throwaway uid
# when it is root itself): resource limits, death with the parent, the seccomp filter; then it
# execs stage 2 in a fresh interpreter, so nothing it loaded (ctypes) stays reachable.
_STAGE1 = r'''
import json, os, sys, resource
cfg = json.loads(sys.argv[1])
layers = cfg["layers"]
code = sys.stdin.buffer.read(cfg["max_code_bytes"] + 1)

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    sys.stderr.flush()
    os._exit(97)

if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0:
    fail("refusing to run model code as root")
with open("main.py", "wb") as f:
    f.write(code)
for which, value in [
    (resource.RLIMIT_CPU, (cfg["cpu_time_s"], cfg["cpu_time_s"] + 1)),
    (resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"])),
    (resource.RLIMIT_FSIZE, (cfg["max_file_bytes"], cfg["max_file_bytes"])),
    (resource.RLIMIT_NOFILE, (cfg["max_open_files"], cfg["max_open_files"])),
    (resource.RLIMIT_CORE, (0, 0)),
    # no new process or thread for this uid (a fresh uid per run when the caller is root)
    (resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"])),
]:
    resource.setrlimit(which, value)
layers.append("rlimits")
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: die with the parent
if cfg["parent_pid"] and os.getppid() != cfg["parent_pid"]:
    os._exit(1)  # the parent died before the line above
if cfg["seccomp"] is not None:
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    pid = os.getpid()
    insns = (Filter * len(cfg["seccomp"]))(
        *[Filter(c, jt, jf, pid if k == -1 else k) for c, jt, jf, k in cfg["seccomp"]])
    prog = Prog(len(cfg["seccomp"]), insns)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        fail("no_new_privs: " + os.strerror(ctypes.get_errno()))
    if libc.prctl(22, 2, ctypes.cast(ctypes.byref(prog), ctypes.c_void_p).value, 0, 0) != 0:
        fail("seccomp filter refused by the kernel: " + os.strerror(ctypes.get_errno())
             + " (set SandboxConfig(seccomp=False) to run without it)")
    layers.append("seccomp")
if cfg["audit_hook"]:
    layers.append("audit_hook")
sys.stderr.buffer.write(b"\x1ezipchat-sandbox-layers " + json.dumps(layers).encode() + b"\n")
sys.stderr.flush()
cwd = os.getcwd()
env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
env.update(cfg["env"])
stage2_cfg = json.dumps({"audit_hook": cfg["audit_hook"]})
exe = sys.executable
os.execve(exe, [exe, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", cfg["stage2"], stage2_cfg], env)
'''

# Stage 2 is the interpreter that runs the user's code, after installing the audit hook. The
# hook refers only to values captured in its closure (builtins, unbound methods of built-in
# types, functions of the `posix` module): user code can rebind builtins or module attributes
# but cannot reach the closure, because no frame or global refers to the hook and the gc
# introspection that could find it is refused.
_STAGE2 = r'''
import sys

def _harden():
    import posix, _posixsubprocess, _imp
    def _refuse_fork_exec(*args, **kwargs):
        raise PermissionError("blocked by sandbox: creating processes is not allowed")
    _posixsubprocess.fork_exec = _refuse_fork_exec  # used by subprocess/multiprocessing, unaudited
    # A fresh builtin module (e.g. a second `posix` with the functions deleted below) or a native
    # extension from outside the standard library would bypass everything here: refuse both.
    _create_builtin, _create_dynamic, _loaded = _imp.create_builtin, _imp.create_dynamic, sys.modules
    _dynload = [p for p in sys.path if p.endswith("/lib-dynload")]
    class _Spec:  # what the originals receive: read once here, so nothing can change in between
        __slots__ = ("name", "origin")
        def __init__(self, name, origin):
            self.name, self.origin = name, origin
    # only captured names below: user code can rebind builtins (any, getattr, ...) but not these
    _getattr, _exact, _Refused, _starts = getattr, str.__add__, PermissionError, str.startswith
    def _denied_name(name):  # importlib.import_module raises no "import" event: checked here too
        for part in _split(name, "."):
            if part in _DENY_IMPORTS:
                raise _Refused(_exact("blocked by sandbox: import of ", name))
    def _guarded_builtin(spec):
        name = _exact("", _getattr(spec, "name"))
        _denied_name(name)
        if name in _loaded or name in ("posix", "_posixsubprocess", "_imp"):
            raise _Refused(_exact("blocked by sandbox: re-creating builtin module ", name))
        return _create_builtin(_Spec(name, None))
    def _guarded_dynamic(spec, file=None):
        name = _exact("", _getattr(spec, "name"))
        origin = _exact("", _getattr(spec, "origin"))
        _denied_name(name)
        allowed = False
        for d in _dynload:
            allowed = allowed or _starts(origin, _exact(d, "/"))
        if not allowed or ".." in origin:
            raise _Refused("blocked by sandbox: native extension outside the standard library")
        return _create_dynamic(_Spec(name, origin))
    _imp.create_builtin, _imp.create_dynamic = _guarded_builtin, _guarded_dynamic
    for module in (posix, sys.modules.get("os")):
        for name in ("mkfifo", "mknod"):  # unaudited file creation
            if module is not None and hasattr(module, name):
                delattr(module, name)

    workdir = posix.getcwd()
    # what may be read: its own directory, the standard library (not site-packages), a few devices
    _read_roots = tuple(p for p in sys.path if p.startswith("/") and not p.endswith(".zip"))
    _read_denied = tuple(r + "/site-packages" for r in _read_roots) + tuple(
        r + "/dist-packages" for r in _read_roots)
    _read_files = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    _getcwd, _readlink, _stat, _getpid = posix.getcwd, posix.readlink, posix.stat, posix.getpid
    _type, _str, _bytes, _int, _tuple = type, str, bytes, int, tuple
    _str_add, _startswith, _split, _join = str.__add__, str.startswith, str.split, str.join
    _lower, _strip, _contains, _mod, _decode = str.lower, str.strip, str.__contains__, str.__mod__, bytes.decode
    _and, _as_int, _issubclass = int.__and__, int.__int__, issubclass
    _Denied = PermissionError
    _O_WRITE = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    _S_IFMT, _S_IFDIR = 0o170000, 0o040000
    _DENY_PREFIXES = ("ctypes.", "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn",
                      "os.fork", "os.system", "os.killpg", "os.symlink", "pty.", "resource.",
                      "gc.get_", "syslog.", "sqlite3.enable_load_extension",
                      "sqlite3.load_extension", "urllib.", "http.client.", "ftplib.",
                      "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.", "webbrowser.")
    _DENY_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "posix", "_xxsubinterpreters",
                     "_xxinterpchannels", "_testcapi", "_testinternalcapi", "_testmultiphase",
                     "_testbuffer", "_testclinic", "_testimportmultiple", "_ctypes_test",
                     "_posixshmem", "_gdbm", "_dbm", "_tkinter", "cffi", "_cffi_backend")
    _PATH_EVENTS = {  # event -> ((index of a path argument, index of its dir_fd or -1), ...)
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
        "os.truncate": ((0, -1),), "os.setxattr": ((0, -1),), "os.removexattr": ((0, -1),),
        "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
        "shutil.rmtree": ((0, -1),),
    }

    def isa(x, cls):  # type() cannot be faked the way __class__ can
        return _issubclass(_type(x), cls)

    def deny(what):
        raise _Denied(_str_add("blocked by sandbox: ", what))

    def as_str(p):
        if isa(p, _str):
            return _str_add("", p)  # exact str even from a subclass with overridden methods
        if isa(p, _bytes):
            return _decode(_bytes(p), "utf-8", "surrogateescape")
        return None

    def fd_path(fd):
        try:
            return _readlink(_mod("/proc/self/fd/%d", (_as_int(fd),)))
        except OSError:
            return None

    def resolve(p, dir_fd):
        """Absolute path with '.' and '..' folded lexically; None when unknowable."""
        if isa(p, _int):
            return fd_path(p)
        s = as_str(p)
        if s is None:
            return None
        if not _startswith(s, "/"):
            if dir_fd is None or (isa(dir_fd, _int) and _as_int(dir_fd) == -100) or (
                    isa(dir_fd, _int) and _as_int(dir_fd) == -1):
                start = _getcwd()
            elif isa(dir_fd, _int):
                start = fd_path(dir_fd)
                if start is None:
                    return None
            else:
                return None
            s = _str_add(_str_add(start, "/"), s)
        parts = []
        for part in _split(s, "/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(part)
        return _str_add("/", _join("/", parts))

    def inside(p, dir_fd=None):
        r = resolve(p, dir_fd)
        return r is not None and (r == workdir or _startswith(r, _str_add(workdir, "/")))

    def under(r, roots):
        for root in roots:
            if r == root or _startswith(r, _str_add(root, "/")):
                return True
        return False

    def readable(p, dir_fd=None):
        r = resolve(p, dir_fd)
        if r is None:
            return False
        if r == workdir or _startswith(r, _str_add(workdir, "/")) or r in _read_files:
            return True
        return under(r, _read_roots) and not under(r, _read_denied)

    def is_dir(path):
        try:
            return _and(_stat(path).st_mode, _S_IFMT) == _S_IFDIR
        except (OSError, ValueError, TypeError):
            return False

    def hook(event, args):
        event = as_str(event)
        for prefix in _DENY_PREFIXES:
            if _startswith(event, prefix):
                deny(event)
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isa(path, _int):
                return
            if mode is None:
                writing = isa(flags, _int) and _and(_as_int(flags), _O_WRITE) != 0
            else:
                m = as_str(mode) or ""
                writing = _contains(m, "w") or _contains(m, "a") or _contains(m, "x") or _contains(m, "+")
            if writing and not inside(path):
                deny(_str_add("writing outside the working directory: ", as_str(path) or "?"))
            if not readable(path):
                deny(_str_add("reading outside the working directory and the standard library: ",
                              as_str(path) or "?"))
            if mode is None and not inside(path):
                # a directory fd from os.open would let dir_fd-relative calls escape the checks
                s = as_str(path)
                if s is None or is_dir(s):
                    deny("os.open of a directory outside the working directory")
        elif event == "import":
            name = as_str(args[0]) or ""
            for part in _split(name, "."):  # every component: a.ctypes is as bad as ctypes
                if part in _DENY_IMPORTS:
                    deny(_str_add("import of ", name))
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0]
            if path is None:
                path = "."
            if not readable(path):
                deny(_str_add("listing outside the working directory and the standard library: ",
                              as_str(path) or "?"))
        elif event in _PATH_EVENTS:
            for index, fd_index in _PATH_EVENTS[event]:
                dir_fd = args[fd_index] if fd_index >= 0 else None
                if not inside(args[index], dir_fd):
                    deny(_str_add(_str_add(event, " outside the working directory: "),
                                  as_str(args[index]) or "?"))
        elif event == "os.chdir":
            if isa(args[0], _int) or not inside(args[0]):
                deny("changing directory outside the working directory")
        elif event == "os.kill":
            if not (isa(args[0], _int) and _as_int(args[0]) == _getpid()):
                deny("signalling other processes")
        elif event == "sqlite3.connect":
            db = as_str(args[0])
            # "file:" URIs name their file in a way inside() cannot read: refused altogether
            if db is None or _startswith(_lower(_strip(db)), "file:") or (
                    db != ":memory:" and db != "" and not inside(db)):
                deny("sqlite database outside the working directory (or a file: URI)")

    sys.addaudithook(hook)

def _main():
    import ast, json, traceback
    if json.loads(sys.argv[1])["audit_hook"]:
        _harden()
    with open("main.py", "rb") as f:
        source = f.read().decode("utf-8", "replace")
    try:
        tree = compile(source, "main.py", "exec", ast.PyCF_ONLY_AST)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            # like a notebook cell: show the value of a final bare expression
            last = compile(ast.Expression(tree.body.pop().value), "main.py", "eval")
        body = compile(tree, "main.py", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        sys.exit(1)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as e:
        sys.stdout.flush()
        # frames of this file ("<string>": _main, the audit hook) are noise to the model
        shown = traceback.TracebackException(type(e), e, e.__traceback__)
        todo, seen = [shown], set()
        while todo:
            te = todo.pop()
            if te is None or id(te) in seen:
                continue
            seen.add(id(te))
            te.stack = traceback.StackSummary.from_list(
                [f for f in te.stack if f.filename != "<string>"])
            todo += [te.__cause__, te.__context__]
        sys.stderr.write("".join(shown.format()))
        sys.exit(1)

_main()
'''

_SIGNAL_MESSAGES = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGSEGV: "the python process crashed (segmentation fault)",
    signal.SIGBUS: "the python process crashed (bus error)",
    signal.SIGABRT: "the python process aborted",
    signal.SIGKILL: "the python process was killed (CPU or memory limit)",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGSYS: "the python process was killed by the system-call filter",
}
_NO_ISOLATION_HINT = ("refusing to run model code without operating-system isolation; pass "
                      "SandboxConfig(allow_unisolated=True) to accept that risk explicitly")


def _isolation_refusal(config: SandboxConfig, bwrap: str | None) -> str | None:
    """Why `config` refuses to run any code, given bubblewrap's path (None: not found), or None."""
    if config.allow_unisolated:
        return None
    if not config.isolate:
        return f"isolate=False: {_NO_ISOLATION_HINT}"
    if bwrap is None:
        return (f"the python sandbox needs bubblewrap ({config.bwrap!r} not found; "
                f"Debian/Ubuntu: apt-get install bubblewrap); {_NO_ISOLATION_HINT}")
    return None


def python_unavailable(config: SandboxConfig = SandboxConfig()) -> str | None:
    """Why the python tool would refuse every call under `config` (one line), or None when it can
    run code. Lets a job say so up front instead of reporting a row of refusals as a score."""
    why = _isolation_refusal(config, shutil.which(config.bwrap) if config.isolate else None)
    return None if why is None else f"every python call will be refused: {why}"


def execute_python(code: str, config: SandboxConfig = SandboxConfig()) -> PythonResult:
    """Runs python source in the sandbox and reports what happened. Never raises.

    The final bare expression, if any, is printed like in a notebook. The child's working
    directory is a fresh scratch directory, gone afterwards, and so is every process it started.

    Args:
      code: python source.
      config: limits and layers.
    Returns:
      A PythonResult; `.text` is what the model should read.
    """
    try:
        return _execute_python(code, config)
    except Exception as e:  # the engine must survive anything
        return PythonResult("", None, False, False, (), f"error: sandbox failed: {type(e).__name__}: {e}")


def run_python(code: str, config: SandboxConfig = SandboxConfig()) -> str:
    """The python tool: output of the code (tracebacks included) plus any sandbox error line."""
    return execute_python(code, config).text


def _refused(message: str) -> PythonResult:
    return PythonResult("", None, False, False, (), "error: " + message)


def _execute_python(code: str, config: SandboxConfig) -> PythonResult:
    if not isinstance(code, str):
        return _refused(f"expected python source text, got {type(code).__name__}")
    data = code.encode("utf-8", "replace")
    if len(data) > config.max_code_bytes:
        return _refused(f"program too long ({len(data)} > {config.max_code_bytes} bytes)")
    bwrap = shutil.which(config.bwrap) if config.isolate else None
    refusal = _isolation_refusal(config, bwrap)
    if refusal:
        return _refused(refusal)
    as_root = os.geteuid() == 0
    # never run model code as root: a root caller hands it to a fresh, otherwise unused uid
    uid = 1_500_000_000 + secrets.randbelow(100_000_000) if as_root else None
    runtime = _runtime(config.python, as_root)
    layers = (["bwrap"] if bwrap else ["no-isolation"]) + (["uid"] if as_root else [])
    child_cfg = {
        "max_code_bytes": config.max_code_bytes, "cpu_time_s": int(math.ceil(config.cpu_time_s)),
        "memory_bytes": config.memory_bytes, "max_file_bytes": config.max_file_bytes,
        "max_open_files": config.max_open_files, "audit_hook": config.audit_hook,
        "max_processes": config.max_processes,
        "seccomp": seccomp_program() if config.seccomp else None, "stage2": _STAGE2,
        "layers": layers, "parent_pid": 0 if bwrap else os.getpid(),
        "env": {} if bwrap else dict(runtime.unisolated_env),
    }
    stage1 = ["-I", "-S", "-B", "-c", _STAGE1, json.dumps(child_cfg)]
    base = None
    if bwrap:
        argv, cwd, env = _bwrap_args(bwrap, runtime, config) + [runtime.exe] + stage1, "/", {}
    else:
        base = tempfile.mkdtemp(prefix="zipchat_sandbox_")
        if uid is not None:
            os.chown(base, uid, uid)
        argv, cwd, env = [runtime.unisolated_exe] + stage1, base, dict(runtime.unisolated_env)
    env.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    deadline = time.monotonic() + config.wall_time_s
    proc = None
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
            env=env, start_new_session=True, close_fds=True,
            **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}))
        raw, status = _exchange(proc, data, deadline, config.max_output_bytes)
        if status == "ok":
            status = _await_exit(proc, deadline)
        _end_run(proc, uid)
        returncode = proc.returncode
        if bwrap and returncode > 128 and returncode - 128 in _SIGNAL_MESSAGES:
            returncode = 128 - returncode  # bwrap reports a child killed by signal N as 128 + N
    finally:
        if proc is not None:
            if proc.returncode is None:
                _end_run(proc, uid)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        if uid is not None:
            _sweep_uid(uid)
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    return _result(raw, returncode, status, config)


def _live_processes(match: Callable[[int, int], bool]) -> list[int]:
    """Pids of processes, zombies excluded, for which match(ppid, real uid) holds."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] in (b"Z", b"X"):
                continue
            if match(int(fields[1]), entry.stat().st_uid):
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _end_run(proc: subprocess.Popen, uid: int | None) -> None:
    """Kills every process of a run, detached ones included, then reaps the child.

    The inside goes first, so that bubblewrap reaps its own child and exits by itself (killed
    first, its init would be left to the host's init as a zombie); then the child's process
    group; then, for a throwaway uid, every process that still has it.
    """
    _kill_all(_live_processes(lambda ppid, _: ppid == proc.pid))  # bwrap's init: its namespace dies
    if uid is not None:
        _kill_all([p for p in _live_processes(lambda _, u: u == uid) if p != proc.pid])
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc)
    proc.wait()
    for _ in range(100 if uid is not None else 0):
        left = _live_processes(lambda _, u: u == uid)
        if not left:
            break
        _kill_all(left)
        time.sleep(0.01)


# World-writable places a throwaway uid could have written to without the operating-system layer.
_SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")


def _sweep_uid(uid: int) -> None:
    """Deletes what a run's throwaway uid left in the shared world-writable directories."""
    for d in _SHARED_WRITABLE + (tempfile.gettempdir(),):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _exchange(proc: subprocess.Popen, data: bytes, deadline: float, max_bytes: int) -> tuple[bytes, str]:
    """Writes the code to stdin and reads output until EOF, the deadline or the byte cap."""
    selector = selectors.DefaultSelector()
    out = bytearray()
    pending = memoryview(data)
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), "timeout"
            for key, _ in selector.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the child closed stdin early: nothing more to send
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        selector.unregister(proc.stdout)
                        continue
                    out += chunk
                    # the layers marker line is not user output; allow for it in the cap
                    if len(out) > max_bytes + 4096:
                        return bytes(out), "overflow"
        return bytes(out), "ok"
    finally:
        selector.close()


def _await_exit(proc: subprocess.Popen, deadline: float) -> str:
    """Waits (without reaping, so the process group id stays ours) for the child to exit."""
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None and info.si_pid == proc.pid:
            return "ok"
        time.sleep(0.002)
    return "timeout"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(raw: bytes, returncode: int, status: str, config: SandboxConfig) -> PythonResult:
    layers: tuple[str, ...] = ()
    marker_at = raw.find(_LAYERS_MARKER)
    if marker_at >= 0:
        line_end = raw.find(b"\n", marker_at)
        line_end = len(raw) if line_end < 0 else line_end
        try:
            layers = tuple(json.loads(raw[marker_at + len(_LAYERS_MARKER):line_end]))
        except ValueError:
            pass
        setup_text, raw = raw[:marker_at], raw[line_end + 1:]
    else:  # stage 1 never finished: everything is setup output
        setup_text, raw = raw, b""
    truncated = status == "overflow"
    if truncated:
        raw = raw[:config.max_output_bytes]
    output = raw.decode("utf-8", "replace")
    if marker_at < 0 and status == "ok":
        detail = setup_text.decode("utf-8", "replace").strip().splitlines()
        line = detail[-1] if detail else f"sandbox setup failed (exit {returncode})"
        if line.startswith("bwrap:"):  # bubblewrap itself refused: say what the host must allow
            line = (f"the python sandbox could not start ({line}); bubblewrap needs unprivileged user "
                    f"namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, "
                    f"no AppArmor userns restriction); {_NO_ISOLATION_HINT}")
        return PythonResult("", returncode, False, False, layers, "error: " + line)
    if status == "timeout":
        error = f"error: execution timed out after {config.wall_time_s:g} s (wall clock)"
    elif truncated:
        error = f"error: output truncated: more than {config.max_output_bytes} bytes, execution stopped"
    elif returncode < 0:
        sig = -returncode
        message = _SIGNAL_MESSAGES.get(sig, f"the python process was killed by signal {sig}")
        if sig == signal.SIGXCPU:
            message += f" ({config.cpu_time_s} s)"
        error = f"error: {message}"
    else:
        error = ""
    return PythonResult(output, returncode, status == "timeout", truncated, layers, error)


# ----------------------------------------------------------------------------------------------
# Search (BM25)

_WORD_RE = re.compile(r"[^\W_]+")


def search_terms(text: str) -> list[str]:
    """Lowercased runs of letters and digits: the index's (and the query's) terms."""
    return _WORD_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    """An inverted index over passages, scored with Okapi BM25.

    Attributes:
      titles: [P] title of the document each passage comes from.
      passages: [P] passage text.
      doc_ids: [P] index of the source document in the list given to `build_search_index`.
      lengths: [P] number of terms in each passage (title terms included).
      postings: term -> ((passage id, term frequency), ...).
      avg_length: mean of `lengths`.
      k1, b: BM25 parameters.
    """

    titles: tuple[str, ...]
    passages: tuple[str, ...]
    doc_ids: tuple[int, ...]
    lengths: tuple[int, ...]
    postings: Mapping[str, tuple[tuple[int, int], ...]]
    avg_length: float
    k1: float
    b: float


def _title_and_text(doc, i: int) -> tuple[str, str]:
    if isinstance(doc, str):
        return "", doc
    if isinstance(doc, Mapping):
        if "text" not in doc:
            raise ValueError(f"document {i} is a mapping without a 'text' key")
        return str(doc.get("title", "")), str(doc["text"])
    if isinstance(doc, (tuple, list)) and len(doc) == 2:
        return str(doc[0]), str(doc[1])
    raise ValueError(f"document {i}: expected str, (title, text) or {{'title', 'text'}}, got {type(doc).__name__}")


def build_search_index(documents: Sequence, *, passage_words: int | None = 120,
                       k1: float = 1.2, b: float = 0.75) -> SearchIndex:
    """Builds a BM25 index over the passages of `documents`.

    Args:
      documents: each a str, a (title, text) pair or a mapping with 'text' (and 'title').
      passage_words: documents are cut into passages of this many whitespace-separated words
        (None: one passage per document). The title is indexed with every passage.
      k1: term-frequency saturation.
      b: length normalisation (0: none, 1: full).
    Returns:
      A SearchIndex.
    """
    if passage_words is not None and passage_words <= 0:
        raise ValueError(f"passage_words must be positive or None, got {passage_words}")
    if k1 < 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    titles, passages, doc_ids, lengths = [], [], [], []
    postings: dict[str, list[tuple[int, int]]] = {}
    for i, doc in enumerate(documents):
        title, text = _title_and_text(doc, i)
        words = text.split()
        step = passage_words or max(len(words), 1)
        for start in range(0, max(len(words), 1), step):
            passage = " ".join(words[start:start + step])
            terms = search_terms(title) + search_terms(passage)
            pid = len(passages)
            counts: dict[str, int] = {}
            for t in terms:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                postings.setdefault(t, []).append((pid, c))
            titles.append(title)
            passages.append(passage)
            doc_ids.append(i)
            lengths.append(len(terms))
    avg = sum(lengths) / len(lengths) if lengths else 0.0
    return SearchIndex(tuple(titles), tuple(passages), tuple(doc_ids), tuple(lengths),
                       {t: tuple(p) for t, p in postings.items()}, avg, k1, b)


def bm25_idf(n_passages: int, n_containing: int) -> float:
    """Okapi BM25 inverse document frequency, the non-negative (Lucene) form."""
    return math.log(1.0 + (n_passages - n_containing + 0.5) / (n_containing + 0.5))


def bm25_scores(index: SearchIndex, query: str) -> dict[int, float]:
    """BM25 score of every passage that contains at least one query term.

    score(q, p) = sum over distinct query terms t of
        idf(t) * tf(t, p) * (k1 + 1) / (tf(t, p) + k1 * (1 - b + b * len(p) / avg_len)).
    """
    n = len(index.passages)
    scores: dict[int, float] = {}
    for term in dict.fromkeys(search_terms(query)):
        posting = index.postings.get(term)
        if not posting:
            continue
        idf = bm25_idf(n, len(posting))
        for pid, tf in posting:
            norm = index.k1 * (1.0 - index.b + index.b * index.lengths[pid] / index.avg_length)
            scores[pid] = scores.get(pid, 0.0) + idf * tf * (index.k1 + 1.0) / (tf + norm)
    return scores


def search(index: SearchIndex, query: str, k: int = 3) -> list[tuple[int, float]]:
    """Top-k (passage id, score), best first; ties broken by passage id."""
    scores = bm25_scores(index, query)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]


def search_tool(index: SearchIndex | None, query: str, k: int = 3, max_snippet_chars: int = 400) -> str:
    """The search tool: the top-k passages as numbered snippets, or a clear message."""
    if index is None:
        return "error: search is not available (no document index was configured)"
    if not isinstance(query, str) or not search_terms(query):
        return "error: empty search query"
    hits = search(index, query, k)
    if not hits:
        return f"no results for {query.strip()!r}"
    blocks = []
    for rank, (pid, _) in enumerate(hits, 1):
        text = index.passages[pid]
        if len(text) > max_snippet_chars:
            text = text[:max_snippet_chars].rsplit(" ", 1)[0] + " ..."
        title = index.titles[pid]
        blocks.append(f"[{rank}] {title}\n{text}" if title else f"[{rank}] {text}")
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# Registry


def make_tools(search_index: SearchIndex | None = None, sandbox: SandboxConfig = SandboxConfig(),
               calculator_config: CalculatorConfig = CalculatorConfig(),
               search_k: int = 3) -> dict[str, Callable[[str], str]]:
    """Tool name -> callable(str) -> str, configured.

    Args:
      search_index: index for the search tool (None: search answers with an error message).
      sandbox: python sandbox limits.
      calculator_config: calculator bounds.
      search_k: passages returned per search.
    """
    return {
        "python": lambda code: run_python(code, sandbox),
        "calculator": lambda expression: calculator(expression, calculator_config),
        "search": lambda query: search_tool(search_index, query, search_k),
    }


# Default registry: calculator and python with default limits; search has no index until an
# experiment builds one with `make_tools(search_index=build_search_index(docs))`.
TOOLS: dict[str, Callable[[str], str]] = make_tools()


def run_tool(name: str, text: str, tools: Mapping[str, Callable[[str], str]] | None = None,
             max_output_chars: int = 4000) -> str:
    """Runs tool `name` on `text` (the decoded tokens between its start and end tokens).

    Never raises: unknown tools, tool failures and bad input come back as "error: ..." text.
    Output longer than `max_output_chars` is cut, with a note saying so.

    Args:
      name: "python", "calculator" or "search" (or any key of `tools`).
      text: the code, expression or query.
      tools: registry to use (default `TOOLS`).
      max_output_chars: cap on the returned text.
    """
    registry = TOOLS if tools is None else tools
    try:
        fn = registry.get(name)
        if fn is None:
            return f"error: unknown tool {name!r} (known: {', '.join(sorted(registry))})"
        out = fn(text)
        if not isinstance(out, str):
            out = str(out)
    except Exception as e:
        return f"error: tool {name!r} failed: {type(e).__name__}: {e}"
    if len(out) > max_output_chars:
        out = out[:max_output_chars] + f"\n[output truncated to {max_output_chars} characters]"
    return out
