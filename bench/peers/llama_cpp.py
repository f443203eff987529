"""llama.cpp's `llama-server` as a throughput peer: built from source, fed an f32 GGUF.

The source is the llama.cpp vendored in the `llama-cpp-python` sdist on PyPI (pinned
below), so the build needs nothing beyond PyPI and a C++ toolchain. Everything lands in
`cache` (~/.cache/hotweights/bench-peers/llama.cpp), outside the repository, and is
reused while present:

- `sdist/` the downloaded archive, `src/` its unpacked tree;
- `build-VERSION/bin/llama-server`: cmake, Release, CPU only, the one target (about 5
  minutes on 2 idle cores; 27 minutes here beside other engineers' test runs, under
  `nice`);
- `build-tools/` cmake and ninja from PyPI, only where the machine has no cmake;
- `convert-deps/` sentencepiece, which the converter imports even for a BPE tokenizer;
- the GGUF itself goes next to the model it was converted from.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from peers.procs import ensure_venv, run_step
from peers.system import PeerUnavailable

VERSION = "0.3.36"
"""The llama-cpp-python sdist whose vendored llama.cpp is built."""
BENCH = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 3600.0


def source_dir(cache: Path, log: Path) -> Path:
    """The vendored llama.cpp tree, downloaded and unpacked on first use."""
    tree = cache / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdist = cache / "sdist"
    archive = sdist / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.exists():
        command: list[str | Path] = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={VERSION}", "--dest", sdist,
        ]  # fmt: skip
        run_step(command, log, timeout=600, stage="install")
    with tarfile.open(archive) as tar:
        tar.extractall(cache / "src", filter="data")
    if not (tree / "CMakeLists.txt").exists():
        raise PeerUnavailable("install", f"{archive} holds no vendor/llama.cpp")
    return tree


def server_binary(cache: Path, log: Path) -> Path:
    """`llama-server`, built on first use."""
    build = cache / f"build-{VERSION}"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = source_dir(cache, log)
    if shutil.which("c++") is None:
        raise PeerUnavailable("install", "no C++ compiler (apt-get install g++)")
    cmake, ninja = build_tools(cache, log)
    generator: list[str | Path] = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    configure: list[str | Path] = [
        "nice", "-n", "10", cmake, "-S", source, "-B", build, *generator,
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]  # fmt: skip
    run_step(configure, log, timeout=600, stage="install")
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    compile_: list[str | Path] = [
        "nice", "-n", "10", cmake, "--build", build, "--target", "llama-server", "-j", jobs,
    ]  # fmt: skip
    run_step(compile_, log, timeout=BUILD_TIMEOUT, stage="install")
    if not binary.exists():
        raise PeerUnavailable("install", f"the build left no {binary}")
    return binary


def build_tools(cache: Path, log: Path) -> tuple[str, str | None]:
    """cmake and ninja: the machine's, else from PyPI into `cache/build-tools`."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is not None:
        return cmake, ninja
    python = ensure_venv(cache / "build-tools", [("cmake", "ninja")], timeout=600, log=log)
    return str(python.with_name("cmake")), str(python.with_name("ninja"))


def gguf_for(model: Path, cache: Path, log: Path) -> Path:
    """`model` (a Hugging Face directory) as an f32 GGUF beside it, converted on first use
    and again whenever the weights are newer than the file."""
    out = model.with_name(model.name + "-f32.gguf")
    weights = model / "model.safetensors"
    if out.exists() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    source = source_dir(cache, log)
    deps = cache / "convert-deps"
    if not (deps / "sentencepiece").exists():
        install: list[str | Path] = [
            sys.executable, "-m", "pip", "install", "--quiet", "--target", deps, "sentencepiece",
        ]  # fmt: skip
        run_step(install, log, timeout=600, stage="install")
    partial = out.with_suffix(".partial")
    convert: list[str | Path] = [
        sys.executable, BENCH / "peers" / "gguf_convert.py", source, model, partial,
    ]  # fmt: skip
    run_step(convert, log, timeout=900, stage="install", env={"PYTHONPATH": str(deps)})
    partial.replace(out)
    return out


def slot_context(prompt_tokens: int, tokens: int) -> int:
    """Context per slot: the longest prompt plus the completion, rounded up to 64 tokens
    with 64 to spare (the chat template's tokens are in `prompt_tokens`)."""
    need = prompt_tokens + tokens + 64
    return -(-need // 64) * 64


def serve_command(
    binary: Path, gguf: Path, port: int, *, parallel: int, threads: int, per_slot: int
) -> list[str | Path]:
    """`llama-server` with one slot per client (`-np`), `threads` for generation and for
    prompt processing, and a context that gives every slot `per_slot` tokens (the server
    splits `-c` evenly among its slots). Continuous batching is on (its default; named to
    be explicit); the chat template is the GGUF's own, run by the Jinja engine, the one
    the Hugging Face tokenizer carries."""
    return [
        binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(parallel * per_slot),
        "-t", str(threads), "-tb", str(threads),
        "--cont-batching", "--jinja", "--no-webui",
    ]  # fmt: skip
