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

Python sandbox layers (defence in depth; each one alone contains the attacks in the tests):
1. Operating system (when the kernel allows it): new network, mount, IPC and UTS namespaces, so
   there is no network at all; a size-capped tmpfs as working directory; fresh empty tmpfs over
   /tmp, /var/tmp and /dev/shm; when running as root, the child switches to a random unused uid
   (files of other users become read-only or invisible, signals to other processes fail, and
   RLIMIT_NPROC=1 forbids any new process or thread; root is exempt from NPROC, which is why
   the uid changes). Not root: an unprivileged user namespace gives the same namespaces and the
   process keeps its own uid (NPROC=1 then applies to it directly).
2. Resource limits, always: CPU seconds, address space, file size, open files, no core dumps,
   and a wall-clock deadline enforced by the parent, which kills the whole process group.
   Output is read through a bounded reader; the process is killed once it writes too much.
3. An audit hook in the child (`sys.addaudithook`), always unless disabled: refuses process
   creation (fork, exec, spawn, subprocess, system), sockets, ctypes and a few native modules,
   writes, deletes, renames or permission changes outside the working directory, and the
   introspection (`gc.get_objects`, ...) that could reach the hook's own state. Audit hooks are
   not a security boundary on their own (CPython says so); they are the second layer here.
The child runs `python -I -S -B` (isolated mode: no environment variables, no user site, no
site-packages, no bytecode writing) with an empty environment except PATH, HOME, TMPDIR, LANG:
the standard library is available, third-party packages are not.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import os
import re
import secrets
import selectors
import shutil
import signal
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
      wall_time_s: wall-clock limit; the process group is killed when it passes.
      cpu_time_s: RLIMIT_CPU in seconds (SIGXCPU at the limit, SIGKILL one second later).
      memory_bytes: RLIMIT_AS, the address-space cap (MemoryError inside python).
      max_output_bytes: stdout+stderr kept; past it the process is killed and output truncated.
      max_file_bytes: RLIMIT_FSIZE, the largest file the code may write.
      disk_bytes: size of the tmpfs working directory (when a mount namespace is available).
      max_open_files: RLIMIT_NOFILE.
      max_code_bytes: longest program accepted.
      isolate: use the operating-system layer (namespaces, tmpfs, uid switch) where possible.
      audit_hook: install the in-process audit hook layer.
      require_isolation: refuse to run (error text) if the operating-system layer is unavailable.
      python: interpreter for the child; default the current one.
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
    audit_hook: bool = True
    require_isolation: bool = False
    python: str = sys.executable

    def __post_init__(self):
        for name in ("wall_time_s", "cpu_time_s", "memory_bytes", "max_output_bytes",
                     "max_file_bytes", "disk_bytes", "max_open_files", "max_code_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PythonResult:
    """What one sandboxed run produced.

    Attributes:
      output: stdout and stderr interleaved as written (tracebacks included), decoded as UTF-8.
      returncode: exit status (negative: killed by that signal); None when never started.
      timed_out: the wall-clock deadline passed.
      truncated: output exceeded `max_output_bytes` and the process was killed.
      layers: the isolation layers that were active, e.g. ("netns", "mountns", "uid", ...).
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
_SETUP_FAILED_EXIT = 97

# Stage 1 runs first in the child, with the parent's privileges: namespaces, tmpfs mounts, uid
# switch, resource limits; then it execs stage 2 in a fresh interpreter, so nothing it loaded
# (ctypes) or knew stays reachable from the user's code.
_STAGE1 = r'''
import json, os, sys, resource
cfg = json.loads(sys.argv[1])
layers = []
code = sys.stdin.buffer.read(cfg["max_code_bytes"] + 1)
base = os.getcwd()
root = os.geteuid() == 0
run_uid, run_gid = (cfg["uid"], cfg["uid"]) if root else (os.getuid(), os.getgid())

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    sys.stderr.flush()
    os._exit(97)

def untraversable_ancestor(path):
    """Topmost directory on the way to path that others cannot search (e.g. /root, mode 700)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None

def interpreter():
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if exe.startswith(prefix + "/"):
        return exe, prefix
    alt = os.path.join(prefix, "bin", "python%d.%d" % sys.version_info[:2])
    return (alt if os.path.exists(alt) else exe), prefix

def isolate(exe, prefix):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "mount %s: %s" % (dst, os.strerror(e)))
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
        1, 2, 4, 32, 4096, 8192, 16384, 1 << 18)
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = (
        0x20000, 0x04000000, 0x08000000, 0x10000000, 0x40000000)
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags | (0 if root else CLONE_NEWUSER)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "unshare: " + os.strerror(e))
    if not root:  # keep our own uid inside the user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    layers.append("netns")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%d,mode=0700,uid=%d,gid=%d" % (cfg["disk_bytes"], run_uid, run_gid))
    base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
    if root:
        # The uid we switch to must reach the interpreter: when its prefix sits under a private
        # directory (/root, mode 700), cover that directory with an empty tmpfs (hiding its other
        # contents, a bonus) and bind the prefix back at the same path, read-only.
        blocker = untraversable_ancestor(prefix)
        if blocker is not None:
            prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
            mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            os.makedirs(prefix, mode=0o755, exist_ok=True)
            mount("/proc/self/fd/%d" % prefix_fd, prefix, None, MS_BIND | MS_REC)
            mount(None, prefix, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(prefix_fd)
    if not os.path.isdir(base) or not os.path.samestat(os.stat(base), os.fstat(base_fd)):
        # base lived under a directory we just covered: put its mount back at the same path
        os.makedirs(base, mode=0o755, exist_ok=True)
        mount("/proc/self/fd/%d" % base_fd, base, None, MS_MOVE)
    os.close(base_fd)
    layers.append("mountns")

exe, prefix = interpreter()
isolated = False
if cfg["isolate"]:
    try:
        isolate(exe, prefix)
        isolated = True
    except Exception as e:
        if cfg["require_isolation"]:
            fail("operating-system isolation unavailable (%s)" % e)
        layers.append("no-isolation: %s" % e)
elif cfg["require_isolation"]:
    fail("require_isolation is set but isolate is off")

with open(os.path.join(base, "main.py"), "wb") as f:
    f.write(code)
switch_uid = root and cfg["isolate"] and (isolated or untraversable_ancestor(prefix) is None)
if switch_uid:
    os.chown(base, run_uid, run_gid)
    os.chown(os.path.join(base, "main.py"), run_uid, run_gid)

limits = [
    (resource.RLIMIT_CPU, (cfg["cpu_time_s"], cfg["cpu_time_s"] + 1)),
    (resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"])),
    (resource.RLIMIT_FSIZE, (cfg["max_file_bytes"], cfg["max_file_bytes"])),
    (resource.RLIMIT_NOFILE, (cfg["max_open_files"], cfg["max_open_files"])),
    (resource.RLIMIT_CORE, (0, 0)),
]
if cfg["isolate"]:
    limits.append((resource.RLIMIT_NPROC, (1, 1)))
for which, value in limits:
    resource.setrlimit(which, value)
layers.append("rlimits")
if switch_uid:
    os.setgroups([])
    os.setgid(run_gid)
    os.setuid(run_uid)
    layers.append("uid")
if cfg["isolate"] and os.getuid() != 0:
    layers.append("nproc")
try:  # die with the parent (set after the uid switch, which clears it; kept across exec)
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
if os.getppid() != cfg["parent_pid"]:
    os._exit(1)
if cfg["audit_hook"]:
    layers.append("audit_hook")
sys.stderr.buffer.write(b"\x1ezipchat-sandbox-layers " + json.dumps(layers).encode() + b"\n")
sys.stderr.flush()
os.chdir(base)  # re-enter: the old cwd is the directory under the tmpfs, not the tmpfs
env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": base, "TMPDIR": base, "LANG": "C.UTF-8"}
stage2_cfg = json.dumps({"audit_hook": cfg["audit_hook"]})
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
    import posix, _posixsubprocess
    def _refuse_fork_exec(*args, **kwargs):
        raise PermissionError("blocked by sandbox: creating processes is not allowed")
    _posixsubprocess.fork_exec = _refuse_fork_exec  # used by subprocess/multiprocessing, unaudited
    for module in (posix, sys.modules.get("os")):
        for name in ("mkfifo", "mknod"):  # unaudited file creation
            if module is not None and hasattr(module, name):
                delattr(module, name)

    workdir = posix.getcwd()
    _getcwd, _readlink, _stat, _getpid = posix.getcwd, posix.readlink, posix.stat, posix.getpid
    _type, _str, _bytes, _int, _tuple = type, str, bytes, int, tuple
    _str_add, _startswith, _split, _join = str.__add__, str.startswith, str.split, str.join
    _partition, _contains, _mod, _decode = str.partition, str.__contains__, str.__mod__, bytes.decode
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
            if mode is None and not inside(path):
                # a directory fd from os.open would let dir_fd-relative calls escape the checks
                s = as_str(path)
                if s is None or is_dir(s):
                    deny("os.open of a directory outside the working directory")
        elif event == "import":
            name = as_str(args[0]) or ""
            if _partition(name, ".")[0] in _DENY_IMPORTS:
                deny(_str_add("import of ", name))
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
            if db is None or (db != ":memory:" and db != "" and not inside(db)):
                deny("sqlite database outside the working directory")

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
}


def execute_python(code: str, config: SandboxConfig = SandboxConfig()) -> PythonResult:
    """Runs python source in the sandbox and reports what happened. Never raises.

    The final bare expression, if any, is printed like in a notebook. The child's working
    directory is a fresh temporary directory, deleted afterwards.

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


def _execute_python(code: str, config: SandboxConfig) -> PythonResult:
    if not isinstance(code, str):
        return PythonResult("", None, False, False, (),
                            f"error: expected python source text, got {type(code).__name__}")
    data = code.encode("utf-8", "replace")
    if len(data) > config.max_code_bytes:
        return PythonResult("", None, False, False, (),
                            f"error: program too long ({len(data)} > {config.max_code_bytes} bytes)")
    child_cfg = {
        "max_code_bytes": config.max_code_bytes, "disk_bytes": config.disk_bytes,
        "cpu_time_s": int(math.ceil(config.cpu_time_s)), "memory_bytes": config.memory_bytes,
        "max_file_bytes": config.max_file_bytes, "max_open_files": config.max_open_files,
        "isolate": config.isolate, "audit_hook": config.audit_hook,
        "require_isolation": config.require_isolation,
        # an otherwise unused uid per run, so that RLIMIT_NPROC and signals see only this run
        "uid": 1_500_000_000 + secrets.randbelow(100_000_000), "stage2": _STAGE2,
        "parent_pid": os.getpid(),
    }
    base = tempfile.mkdtemp(prefix="zipchat_sandbox_")
    deadline = time.monotonic() + config.wall_time_s
    proc = None
    try:
        proc = subprocess.Popen(
            [config.python, "-I", "-S", "-B", "-c", _STAGE1, json.dumps(child_cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=base,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True, close_fds=True)
        raw, status = _exchange(proc, data, deadline, config.max_output_bytes)
        if status == "ok":
            status = _await_exit(proc, deadline)
        _kill_group(proc)  # also takes any process left in the group, before reaping the leader
        returncode = proc.wait()
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_group(proc)
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        shutil.rmtree(base, ignore_errors=True)
    return _result(raw, returncode, status, config)


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
        return PythonResult("", returncode, False, False, layers,
                            "error: " + (detail[-1] if detail else f"sandbox setup failed (exit {returncode})"))
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
