"""Tools: calculator refusals and exactness, BM25 against hand-computed scores, the registry, and
the python sandbox against each attack, with each isolation layer on its own and both together."""
import concurrent.futures
import dataclasses
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from core import tokenizer, tools
from core.tools import SandboxConfig

# ----------------------------------------------------------------------------------------------
# Calculator


@pytest.mark.parametrize("expression, expected", [
    ("2+3*4", "14"),
    ("(1 + 2) ** 10", "59049"),
    ("2**100", "1267650600228229401496703205376"),
    ("7/2", "3.5"),
    ("8/2", "4"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("-(3 - 10)", "7"),
    ("0.1 + 0.2", "0.3"),
    ("1e3 + 1", "1001"),
    ("2**-1", "0.5"),
    ("12 \u00d7 3 =", "36"),
    ("10 \u00f7 4", "2.5"),
    ("1_000_000 * 3", "3000000"),
    ("123456789012345678901234567890 * 987654321098765432109876543210",
     str(123456789012345678901234567890 * 987654321098765432109876543210)),
    ("10**999 - 1", "9" * 999),
])
def test_calculator_values(expression, expected):
    assert tools.calculator(expression) == expected


@pytest.mark.parametrize("expression, fragment", [
    ("10**1000", "too large"),               # 1001 digits, one over the bound
    ("9**9**9", "too large"),                # refused before computing
    ("99999999999**99999", "too large"),
    ("(10**600) * (10**600)", "too large"),  # a product over the bound
    ("2**10000 * 1", "too large"),
    ("1e308 * 10", "too large for a float"),
    ("2.0 ** 10**10", "exponent too large"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("x + 1", "names are not allowed"),
    ("__import__('os').system('true')", "function calls are not allowed"),
    ("abs(-1)", "function calls are not allowed"),
    ("(1).real", "attribute access is not allowed"),
    ("(2).__class__", "attribute access is not allowed"),
    ("True + 1", "only int and float"),
    ("'a' * 3", "only int and float"),
    ("1j * 2", "only int and float"),
    ("2 ^ 10", "use **"),
    ("1,000 + 1", "commas are not allowed"),
    ("[1, 2]", "unsupported syntax"),
    ("lambda: 1", "unsupported syntax"),
    ("1 << 10", "not allowed"),
    ("(-8) ** (1/3)", "complex"),
    ("", "empty expression"),
    ("1 +", "invalid expression"),
    ("1+" * 300 + "1", "too long"),
])
def test_calculator_refusals(expression, fragment):
    out = tools.calculator(expression)
    assert out.startswith("error:") and fragment in out, out


def test_calculator_node_bound_and_non_string():
    config = tools.CalculatorConfig(max_nodes=20)
    assert "too complex" in tools.calculator("+".join(["1"] * 20), config)
    assert tools.calculator(12).startswith("error:")  # type: ignore[arg-type]
    with pytest.raises(tools.CalculatorError):
        tools.calculate("import os")


# ----------------------------------------------------------------------------------------------
# Search


def test_bm25_matches_hand_computed_scores():
    docs = ["the cat sat on the mat", "the dog sat", "cats and dogs", "cat cat cat dog"]
    index = tools.build_search_index(docs, passage_words=None, k1=1.2, b=0.75)
    # lengths 6, 3, 3, 4 -> avgdl 4; N = 4. "cat" is in docs 0 and 3, "sat" in docs 0 and 1.
    idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))  # the same for both terms: ln 2
    assert idf == pytest.approx(math.log(2))

    def term(tf, length):
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / 4))

    expected = {0: term(1, 6) + term(1, 6), 1: term(1, 3), 3: term(3, 4)}
    # written out: doc 0 = 2 * ln2 * 2.2 / 2.65, doc 1 = ln2 * 2.2 / 1.975, doc 3 = ln2 * 6.6 / 4.2
    assert expected[0] == pytest.approx(2 * math.log(2) * 2.2 / 2.65)
    assert expected[1] == pytest.approx(math.log(2) * 2.2 / 1.975)
    assert expected[3] == pytest.approx(math.log(2) * 6.6 / 4.2)
    scores = tools.bm25_scores(index, "Cat SAT?")
    assert set(scores) == {0, 1, 3}  # "cats" is a different term (no stemming)
    for pid, value in expected.items():
        assert scores[pid] == pytest.approx(value, rel=1e-12)
    assert [pid for pid, _ in tools.search(index, "cat sat", k=2)] == [0, 3]  # 1.151 > 1.089
    assert tools.bm25_scores(index, "cat cat sat") == scores  # distinct query terms count once


def test_bm25_idf_rare_terms_weigh_more():
    index = tools.build_search_index(["apple banana", "apple cherry", "apple date"], passage_words=None)
    scores = tools.bm25_scores(index, "apple cherry")
    assert max(scores, key=scores.get) == 1
    assert tools.bm25_idf(3, 3) < tools.bm25_idf(3, 1)


def test_search_tool_passages_titles_and_messages():
    docs = [
        {"title": "Zorblat River", "text": "The Zorblat River flows north. " + "filler words here " * 60
         + "Its delta hosts the city of Quenn."},
        ("Mount Ferrow", "Mount Ferrow is the highest peak, 4123 meters tall."),
        "An untitled note about nothing in particular.",
    ]
    index = tools.build_search_index(docs, passage_words=40)
    assert len(index.passages) > 3 and index.doc_ids.count(0) > 1  # the long document is cut up
    out = tools.search_tool(index, "Quenn delta city", k=2)
    assert out.startswith("[1] Zorblat River\n") and "city of Quenn" in out.split("\n\n")[0]
    out = tools.search_tool(index, "how tall is ferrow", k=1)
    assert out == "[1] Mount Ferrow\nMount Ferrow is the highest peak, 4123 meters tall."
    assert tools.search_tool(index, "xylophone") == "no results for 'xylophone'"
    assert tools.search_tool(index, "  ?! ").startswith("error:")
    assert tools.search_tool(None, "anything").startswith("error: search is not available")
    with pytest.raises(ValueError, match="document 0"):
        tools.build_search_index([{"title": "no text"}])


# ----------------------------------------------------------------------------------------------
# Registry


def test_tool_tokens_are_tokenizer_special_tokens():
    for name, (start, end) in tools.TOOL_TOKENS.items():
        assert start in tokenizer.SPECIAL_TOKENS and end in tokenizer.SPECIAL_TOKENS
        assert tools.START_TOKEN_TO_TOOL[start] == name and tools.END_TOKEN_TO_TOOL[end] == name
    assert tools.OUTPUT_START in tokenizer.SPECIAL_TOKENS and tools.OUTPUT_END in tokenizer.SPECIAL_TOKENS
    assert set(tools.TOOLS) == set(tools.TOOL_NAMES)


def test_run_tool_never_raises():
    def broken(_):
        raise RuntimeError("boom")

    registry = {"broken": broken, "long": lambda s: s * 1000, "number": lambda s: 42}
    assert tools.run_tool("broken", "x", registry) == "error: tool 'broken' failed: RuntimeError: boom"
    assert tools.run_tool("nope", "x", registry).startswith("error: unknown tool 'nope'")
    long = tools.run_tool("long", "ab", registry, max_output_chars=100)
    assert long.startswith("ab" * 50) and long.endswith("[output truncated to 100 characters]")
    assert tools.run_tool("number", "", registry) == "42"
    assert tools.run_tool("calculator", "6*7") == "42"
    assert tools.run_tool("calculator", None).startswith("error:")  # type: ignore[arg-type]
    assert tools.run_tool("search", "x").startswith("error: search is not available")
    index = tools.build_search_index([("Kettle", "A kettle boils water.")])
    assert tools.run_tool("search", "boils", tools.make_tools(search_index=index)).startswith("[1] Kettle")


# ----------------------------------------------------------------------------------------------
# Python sandbox

FAST = dict(wall_time_s=3.0, cpu_time_s=1, memory_bytes=256 * 2**20, max_output_bytes=4096)
UNISOLATED = dict(isolate=False, allow_unisolated=True)
LAYERS = {  # each layer alone (rlimits and, for a root caller, the throwaway uid are always on)
    "full": SandboxConfig(**FAST),
    "os_only": SandboxConfig(seccomp=False, audit_hook=False, **FAST),
    "seccomp_only": SandboxConfig(audit_hook=False, **UNISOLATED, **FAST),
    "hook_only": SandboxConfig(seccomp=False, **UNISOLATED, **FAST),
}
ROOT = os.geteuid() == 0
# Layers that keep the host's files out of reach; seccomp filters system calls, not paths, and
# (for a root caller) the throwaway uid adds the file permissions of "other".
CONFINING = ("full", "os_only", "hook_only")
_probed: dict[str, str] = {}


def _probe(name: str) -> None:
    """Skips (fails in CI, which installs bubblewrap) where the host refuses a layer."""
    if name not in _probed:
        _probed[name] = tools.execute_python("print('ok')", LAYERS[name]).error
    if _probed[name]:
        message = f"layer {name} unavailable here: {_probed[name]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _layer_fixture(names):
    @pytest.fixture(params=list(names))
    def fixture(request) -> SandboxConfig:
        _probe(request.param)
        return LAYERS[request.param]
    return fixture


layer = _layer_fixture(LAYERS)  # every layer alone, and all together
confining = _layer_fixture(CONFINING)
# writes outside the scratch directory: the uid's permissions contain them under seccomp alone
writing_layer = _layer_fixture(LAYERS if ROOT else CONFINING)


@pytest.fixture
def sentinel(tmp_path) -> pathlib.Path:
    d = tmp_path / "keep"
    d.mkdir()
    (d / "sentinel.txt").write_text("precious")
    return d / "sentinel.txt"


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "<dir>") for p in root.rglob("*")}


def _attempts(*snippets: str) -> str:
    """One program trying every snippet in turn; each prints a marker only if it succeeded."""
    blocks = []
    for snippet in snippets:
        body = "\n".join("    " + line for line in snippet.strip().splitlines())
        blocks.append(f"try:\n{body}\nexcept BaseException as e:\n    print('refused:', type(e).__name__)")
    return "import os, sys\n" + "\n".join(blocks)


def test_sandbox_runs_code_and_reports_errors(layer):
    assert tools.run_python("print(6 * 7)", layer) == "42\n"
    assert tools.run_python("x = 3\nx ** 2", layer) == "9\n"  # final expression shown like a notebook
    out = tools.run_python("def f():\n    return 1 / 0\nf()", layer)
    assert out.startswith("Traceback") and 'File "main.py", line 2, in f' in out
    assert out.rstrip().endswith("ZeroDivisionError: division by zero") and "<string>" not in out
    assert "SyntaxError" in tools.run_python("def f(:", layer)
    assert "EOFError" in tools.run_python("input()", layer)
    open_write = tools.run_python("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())", layer)
    assert open_write == "hi\n"  # its own directory is writable


def test_sandbox_reports_its_layers_and_never_runs_as_root(layer):
    result = tools.execute_python("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())",
                                  layer)
    uid, euid, gid, groups = result.output.split(" ", 3)
    assert 0 not in (int(uid), int(euid), int(gid)) and "0" not in groups.strip("[]\n").split(", ")
    expected = {"rlimits"} | ({"uid"} if ROOT else set()) | ({"bwrap"} if layer.isolate else {"no-isolation"})
    expected |= ({"seccomp"} if layer.seccomp else set()) | ({"audit_hook"} if layer.audit_hook else set())
    assert set(result.layers) == expected


def test_sandbox_environment_is_scrubbed_and_workdir_thrown_away(layer, monkeypatch):
    monkeypatch.setenv("ZIPCHAT_SECRET_TOKEN", "hunter2")
    out = tools.run_python("import os\nprint(os.getcwd())\nprint(sorted(os.environ))", layer)
    workdir, env = out.splitlines()
    assert "ZIPCHAT_SECRET_TOKEN" not in env and "hunter2" not in out
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "LD_LIBRARY_PATH"}
    assert not os.path.exists(workdir)


def test_fork_bomb_is_contained(layer):
    # bounded to 2**5 processes so that a failing test cannot take the machine down
    code = _attempts("""
for _ in range(5):
    if os.fork() == 0:
        print('FORKED', flush=True)
""", """
import pty
if pty.fork()[0] == 0:
    print('FORKED', flush=True)
    os._exit(0)
""", """
import threading
threading.Thread(target=lambda: None).start()
print('THREAD')
""")
    result = tools.execute_python("import os\nprint('uid', os.getuid(), flush=True)\n" + code, layer)
    assert "FORKED" not in result.output and result.output.count("refused:") >= 2, result.text
    uid = int(result.output.split()[1])
    if uid != 0 and uid != os.getuid():  # a per-run uid: no process of it may survive the run
        assert _live_of_uid(uid) == []


def _live_of_uid(uid: int) -> list[pathlib.Path]:
    """Processes of `uid` that are not zombies (a zombie is dead; init reaps it in its time)."""
    return [p for p in pathlib.Path("/proc").iterdir()
            if p.name.isdigit() and _uid_of(p) == uid and _state_of(p) not in (None, "Z", "X")]


def _uid_of(proc_dir: pathlib.Path) -> int | None:
    try:
        for line in (proc_dir / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_process_spawning_is_contained(writing_layer, sentinel):
    layer = writing_layer
    d = sentinel.parent
    code = _attempts(
        "import subprocess\nsubprocess.run(['true'], check=True)\nprint('SPAWNED subprocess')",
        f"assert os.system('touch {d}/by_system') == 0\nprint('SPAWNED system')",
        "pid = os.posix_spawn('/bin/true', ['true'], {})\nos.waitpid(pid, 0)\nprint('SPAWNED posix_spawn')",
        "import multiprocessing as mp\np = mp.Process(target=print, args=('SPAWNED mp',))\np.start()\np.join()",
    )
    before = _tree(d.parent)
    out = tools.run_python(code, layer)
    assert "SPAWNED" not in out and out.count("refused:") == 4, out
    assert _tree(d.parent) == before
    # exec replaces the process (same limits, namespaces and uid), so the OS layer allows it; the
    # hook refuses it anyway, so that the model gets a clear error rather than a foreign program
    out = tools.run_python("import os\nos.execv('/bin/echo', ['echo', 'EXECED'])", layer)
    assert ("blocked by sandbox: os.exec" in out) == layer.audit_hook, out


def test_network_is_unreachable(layer):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    port, udp_port = server.getsockname()[1], udp.getsockname()[1]
    try:
        code = _attempts(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\nprint('CONNECTED')",
            f"import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"u.sendto(b'leak', ('127.0.0.1', {udp_port}))\nprint('SENT')",
            "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)\nprint('FETCHED')",
        )
        out = tools.run_python(code, layer)
        assert "CONNECTED" not in out and "FETCHED" not in out, out
        # in its own network namespace a datagram to its own loopback "succeeds" and goes nowhere;
        # every other layer refuses to create the socket
        assert out.count("refused:") == (2 if layer.isolate and not (layer.seccomp or layer.audit_hook) else 3), out
        with pytest.raises(BlockingIOError):  # nobody reached our listening socket
            server.accept()
        with pytest.raises(BlockingIOError):  # nor our datagram socket
            udp.recv(16)
    finally:
        server.close()
        udp.close()


def test_writes_outside_workdir_are_contained(writing_layer, sentinel):
    layer = writing_layer
    d = sentinel.parent
    code = _attempts(
        f"open(r'{d}/new.txt', 'w').write('x')\nprint('WROTE new')",
        f"import pathlib\npathlib.Path(r'{d}/new2.txt').write_text('x')\nprint('WROTE pathlib')",
        f"open(r'{sentinel}', 'w').write('overwritten')\nprint('WROTE truncate')",
        f"open(r'{sentinel}', 'a').write('appended')\nprint('WROTE append')",
        f"fd = os.open(r'{d}/new3.txt', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\nprint('WROTE os.open')",
        f"open(os.path.relpath(r'{d}/new4.txt'), 'w').write('x')\nprint('WROTE relative')",
        f"os.symlink(r'{d}', 'link')\nopen('link/new5.txt', 'w').write('x')\nprint('WROTE symlink')",
        f"os.mkdir(r'{d}/newdir')\nprint('WROTE mkdir')",
    )
    before = _tree(d.parent)
    out = tools.run_python(code, layer)
    assert "WROTE" not in out and out.count("refused:") == 8, out
    assert sentinel.read_text() == "precious"
    assert _tree(d.parent) == before


def test_deletes_outside_workdir_are_contained(writing_layer, sentinel):
    layer = writing_layer
    d = sentinel.parent
    code = _attempts(
        f"os.remove(r'{sentinel}')\nprint('DELETED remove')",
        f"os.rename(r'{sentinel}', r'{d}/moved.txt')\nprint('DELETED rename')",
        f"import shutil\nshutil.rmtree(r'{d}')\nprint('DELETED rmtree')",
        f"fd = os.open(r'{d}', os.O_RDONLY)\nos.unlink('sentinel.txt', dir_fd=fd)\nprint('DELETED dir_fd')",
        f"os.chmod(r'{sentinel}', 0)\nprint('DELETED chmod')",
        f"os.truncate(r'{sentinel}', 0)\nprint('DELETED truncate')",
    )
    before = _tree(d.parent)
    out = tools.run_python(code, layer)
    assert "DELETED" not in out and out.count("refused:") == 6, out
    assert sentinel.read_text() == "precious" and (sentinel.stat().st_mode & 0o777) != 0
    assert _tree(d.parent) == before


def test_ctypes_tricks_are_contained(writing_layer, sentinel):
    layer = writing_layer
    d = sentinel.parent
    code = _attempts(
        f"import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.system(b'touch {d}/by_libc') == 0\nprint('LIBC system')",
        "import ctypes\npid = ctypes.CDLL(None).fork()\nassert pid >= 0\nprint('LIBC fork')\nif pid == 0: os._exit(0)",
        f"import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.unlink(b'{sentinel}') == 0\nprint('LIBC unlink')",
    )
    before = _tree(d.parent)
    out = tools.run_python(code, layer)
    assert "LIBC" not in out and out.count("refused:") == 3, out
    assert _tree(d.parent) == before


def test_segfault_is_reported_and_engine_survives(layer):
    out = tools.run_python("import ctypes\nctypes.string_at(0)", layer)
    if layer.audit_hook:
        assert "blocked by sandbox: import of ctypes" in out
    else:
        assert out.startswith("error: the python process crashed")
    # a C-stack overflow crashes the interpreter without ctypes, under every layer
    out = tools.run_python("import sys, json\nsys.setrecursionlimit(10**9)\njson.loads('[' * 10**6)", layer)
    assert out == "error: the python process crashed (segmentation fault)", out
    assert tools.run_python("print('still alive')", layer) == "still alive\n"


def test_memory_bomb_is_contained():
    config = LAYERS["full"]
    out = tools.run_python("x = bytearray(10**10)", config)
    assert out.rstrip().endswith("MemoryError"), out
    out = tools.run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(2**20))", config)
    assert "MemoryError" in out or out.startswith("error:"), out


def test_huge_output_is_truncated_and_stopped():
    config = LAYERS["full"]
    result = tools.execute_python("while True:\n    print('x' * 1000)", config)
    assert result.truncated and not result.timed_out
    assert len(result.output.encode()) <= config.max_output_bytes
    cap = config.max_output_bytes
    assert result.text.endswith(f"error: output truncated: more than {cap} bytes, execution stopped")
    result = tools.execute_python("print('y' * 10**7)", config)
    assert result.truncated and set(result.output) == {"y"}


def test_infinite_loop_and_sleep_are_stopped():
    config = SandboxConfig(wall_time_s=2.0, cpu_time_s=1)
    result = tools.execute_python("print('started', flush=True)\nwhile True:\n    pass", config)
    # the CPU limit fires first on an idle machine; the wall clock on a busy one
    assert result.output == "started\n" and result.error in (
        "error: CPU time limit exceeded (1 s)", "error: execution timed out after 2 s (wall clock)")
    result = tools.execute_python("import time\ntime.sleep(60)", SandboxConfig(wall_time_s=1.0))
    assert result.timed_out and result.text == "error: execution timed out after 1 s (wall clock)"


def test_file_size_and_input_limits():
    config = SandboxConfig(max_file_bytes=1000, **{k: v for k, v in FAST.items()})
    code = ("import os\nfd = os.open('big.bin', os.O_WRONLY | os.O_CREAT)\ntry:\n"
            "    for _ in range(5):\n        os.write(fd, b'x' * 1000)\n"
            "finally:\n    print('size', os.path.getsize('big.bin'))")
    out = tools.run_python(code, config)
    assert "OSError: [Errno 27] File too large" in out and "size 1000\n" in out, out
    assert tools.run_python("x" * 200, SandboxConfig(max_code_bytes=100)).startswith("error: program too long")
    assert tools.run_python(None).startswith("error:")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wall_time_s"):
        SandboxConfig(wall_time_s=0)


def test_concurrent_runs_do_not_interfere():
    config = LAYERS["full"]
    codes = [f"import os\nopen('id.txt', 'w').write('{i}')\nprint(open('id.txt').read(), len(os.listdir('.')))"
             for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda c: tools.run_python(c, config), codes))
    assert outs == [f"{i} 2\n" for i in range(6)]  # main.py and its own id.txt only


@pytest.mark.parametrize("name", ["full", "hook_only"])
def test_sandbox_dies_with_its_parent(tmp_path, name):
    # a parent that starts a sleeping sandbox and is then killed must not leave it running
    _probe(name)
    config = "tools.SandboxConfig(wall_time_s=60)" if name == "full" else \
        "tools.SandboxConfig(wall_time_s=60, isolate=False, allow_unisolated=True)"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); from core import tools\n"
        f"tools.run_python('import os, time\\nprint(os.getpid(), flush=True)\\ntime.sleep(60)', {config})"),
        str(pathlib.Path(__file__).parents[1])],
        env={**os.environ, "TMPDIR": str(tmp_path)})  # the killed parent leaves its work dir there
    deadline = time.time() + 20
    children = []
    while time.time() < deadline and not children:  # the first run may build the runtime copy
        time.sleep(0.5)
        children = _descendants(parent.pid)
    time.sleep(0.5)
    children = _descendants(parent.pid)
    parent.kill()
    parent.wait()
    assert children, "the sandbox did not start"
    deadline = time.time() + 3
    while time.time() < deadline and any(c.exists() and _state_of(c) not in (None, "Z") for c in children):
        time.sleep(0.05)
    assert not any(c.exists() and _state_of(c) not in (None, "Z") for c in children)


def _descendants(pid: int) -> list[pathlib.Path]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c in pathlib.Path("/proc").iterdir() if c.name.isdigit() and _ppid_of(c) == p]
        found += kids
        todo += [int(c.name) for c in kids]
    return found


def _ppid_of(proc_dir: pathlib.Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _state_of(proc_dir: pathlib.Path) -> str | None:
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------
# What the code may see, what survives it, and when the sandbox refuses to run


def test_host_is_invisible(confining, monkeypatch):
    monkeypatch.setenv("ZIPCHAT_PARENT_SECRET", "swordfish")
    repo_file = pathlib.Path(tools.__file__).resolve()
    numpy_init = pathlib.Path(__import__("numpy").__file__).resolve()
    home = pathlib.Path.home()
    home_names = sorted(p.name for p in home.iterdir() if p.name != ".pyenv")[:20]
    pid = os.getpid()
    code = _attempts(
        f"print('READ repo', len(open(r'{repo_file}').read()))",
        f"print('READ site-packages', len(open(r'{numpy_init}').read()))",
        "print('READ etc', len(open('/etc/passwd').read()))",
        "names = os.listdir('/')\nprint('LISTED root' if {'etc', 'home', 'var'} & set(names) else 'root ok', names)",
        f"names = set(os.listdir(r'{home}'))\nprint('LISTED home' if names & set({home_names!r}) else 'home ok')",
        f"print('SAW host process' if '{pid}' in os.listdir('/proc') else 'proc ok')",
        f"print('READ cmdline', open('/proc/{pid}/cmdline', 'rb').read()[:40])",
        f"print('READ environ' if b'swordfish' in open('/proc/{pid}/environ', 'rb').read() else 'env ok')",
        "import numpy\nprint('IMPORTED numpy')",
    )
    out = tools.run_python(code, confining)
    for marker in ("READ", "LISTED", "SAW", "IMPORTED"):
        assert marker not in out, out
    assert out.count("refused:") + out.count(" ok") == 9, out


def test_writes_do_not_outlive_the_run(writing_layer):
    tag = f"zipchat_probe_{os.getpid()}_{time.monotonic_ns()}"
    targets = [f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}"]
    code = _attempts(
        *[f"open(r'{t}', 'w').write('x')\nprint('WROTE {t}')" for t in targets],
        f"import sqlite3\nc = sqlite3.connect('file:/tmp/{tag}.db?mode=rwc', uri=True)\n"
        "c.execute('create table t(x)')\nc.commit()\nprint('WROTE sqlite uri')",
        "import _imp, importlib.machinery\nposix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n"
        f"posix.mkfifo('/tmp/{tag}.fifo')\nprint('WROTE fifo')",
        f"os.mkfifo('/tmp/{tag}.fifo2')\nprint('WROTE fifo2')",
    )
    out = tools.run_python(code, writing_layer)
    leftovers = [p for p in pathlib.Path("/").glob(f"*/{tag}*")] + list(pathlib.Path("/dev/shm").glob(f"{tag}*"))
    leftovers += list(pathlib.Path("/var/tmp").glob(f"{tag}*"))
    assert leftovers == [], (leftovers, out)
    if writing_layer.isolate or writing_layer.audit_hook:  # refused, not just cleaned up
        assert "WROTE" not in out and out.count("refused:") == 6, out


def test_scratch_space_is_capped():
    for name in ("full", "os_only"):
        _probe(name)
        config = dataclasses.replace(LAYERS[name], disk_bytes=2**20, max_file_bytes=600_000)
        code = ("import errno\ntry:\n    for i in range(4):\n        open(f'f{i}', 'wb').write(b'x' * 500_000)\n"
                "    print('NOT CAPPED')\nexcept OSError as e:\n    print('full', e.errno == errno.ENOSPC)")
        assert tools.run_python(code, config) == "full True\n", name


def test_import_deny_list_matches_every_component():
    _probe("hook_only")
    config = LAYERS["hook_only"]
    out = tools.run_python("__import__('json.ctypes')", config)
    assert "blocked by sandbox: import of json.ctypes" in out, out
    # importlib.import_module raises no "import" audit event; the module's creation is checked
    out = tools.run_python("import importlib\nimportlib.import_module('_testcapi')", config)
    assert "blocked by sandbox: import of _testcapi" in out, out
    out = tools.run_python("import importlib.util\nimportlib.util.find_spec('json')\nprint('fine')", config)
    assert out == "fine\n"


def test_refuses_to_run_without_isolation(tmp_path):
    marker = tmp_path / "ran"
    code = f"open(r'{marker}', 'w').write('x')"
    for config in (SandboxConfig(isolate=False), SandboxConfig(bwrap=str(tmp_path / "no-bwrap"))):
        result = tools.execute_python(code, config)
        assert result.returncode is None and "allow_unisolated=True" in result.error, result
        assert "refusing to run model code without operating-system isolation" in result.error
    assert "bubblewrap" in tools.run_python(code, SandboxConfig(bwrap=str(tmp_path / "no-bwrap")))
    assert not marker.exists()
    # the same refusal is known up front, so a job can say so before it spends its time
    for config in (SandboxConfig(isolate=False), SandboxConfig(bwrap=str(tmp_path / "no-bwrap"))):
        assert "refused" in tools.python_unavailable(config)
    assert tools.python_unavailable(SandboxConfig(bwrap=str(tmp_path / "no-bwrap"), allow_unisolated=True)) is None
    if shutil.which("bwrap"):
        assert tools.python_unavailable() is None
    # asked for explicitly, it runs (still never as root; see test_sandbox_reports_its_layers...)
    result = tools.execute_python("print('ran')", SandboxConfig(bwrap=str(tmp_path / "no-bwrap"),
                                                                allow_unisolated=True))
    assert result.output == "ran\n" and "no-isolation" in result.layers


@pytest.mark.skipif(not ROOT, reason="finding a run's processes from outside needs its throwaway uid (root)")
@pytest.mark.parametrize("name", ["os_only", "unisolated"])
def test_detached_processes_die_with_the_run(name):
    # processes allowed (max_processes) and no seccomp or hook: only the PID namespace (os_only)
    # or the throwaway uid's sweep (unisolated) can end the detached grandchild
    if name == "os_only":
        _probe("os_only")
        config = dataclasses.replace(LAYERS["os_only"], max_processes=16)
    else:
        config = SandboxConfig(seccomp=False, audit_hook=False, max_processes=16, **UNISOLATED, **FAST)
    code = ("import os, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
            "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\nprint('forked')")
    result = tools.execute_python(code, config)
    assert result.output.endswith("forked\n"), result.text
    uid = int(result.output.split()[0])
    assert _live_of_uid(uid) == []


def test_seccomp_layer_alone_denies_dangerous_system_calls():
    _probe("seccomp_only")
    code = _attempts(
        "pid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0)\nprint('DONE fork')",
        "import socket\nsocket.socket(socket.AF_UNIX)\nprint('DONE socket')",
        "os.mkfifo('fifo')\nprint('DONE mkfifo')",
        "os.kill(1, 0)\nprint('DONE kill')",
        "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0\nprint('DONE unshare')",
        "import ctypes\nassert ctypes.CDLL(None).ptrace(0, 0, 0, 0) == 0\nprint('DONE ptrace')",
        "import threading\nt = threading.Thread(target=print, args=('thread ran',))\nt.start()\nt.join()",
        "import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\nos.setpriority(os.PRIO_PROCESS, os.getppid(), 5)\n"
        "print('DONE setpriority')",
    )
    limits = dict(max_processes=64, **UNISOLATED, **FAST)
    with_filter = tools.run_python(code, SandboxConfig(audit_hook=False, **limits))
    assert "DONE" not in with_filter and with_filter.count("refused:") == 7, with_filter
    assert "thread ran" in with_filter  # threads are not processes
    # the control: without the filter (and nothing else in the way) the same calls go through,
    # so the refusals above are the filter's
    without = tools.run_python(code, SandboxConfig(audit_hook=False, seccomp=False, **limits))
    for call in ("fork", "socket", "mkfifo", "unshare", "ptrace"):
        assert f"DONE {call}" in without, without


def test_seccomp_program_shape():
    for machine in ("x86_64", "aarch64"):
        prog = tools.seccomp_program(machine)
        assert prog[0] == (0x20, 0, 0, 4) and prog[-2] == (0x06, 0, 0, 0x7FFF0000)  # arch check, allow
        for i, (code, jt, jf, k) in enumerate(prog):  # every jump lands inside the program
            if code & 0x07 == 0x05:
                assert i + 1 + max(jt, jf) < len(prog)
    with pytest.raises(ValueError, match="seccomp=False"):
        tools.seccomp_program("sparc")


def test_bubblewrap_failure_is_a_refusal_not_a_fallback(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # reachable by a root caller's throwaway uid
        os.chmod(d, 0o755)
        fake = pathlib.Path(d) / "bwrap"
        fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
        fake.chmod(0o755)
        marker = tmp_path / "ran"
        result = tools.execute_python(f"open(r'{marker}', 'w')", SandboxConfig(bwrap=str(fake), **FAST))
    assert result.error.startswith("error: the python sandbox could not start (bwrap: setting up uid map")
    assert "unprivileged user namespaces" in result.error and "allow_unisolated=True" in result.error
    assert result.output == "" and not marker.exists()
