"""Launching SGLang servers and checking the installed version.

r1mega runs one HTTP server per engine (`python -m sglang.launch_server`), as verl and slime now
do, rather than the in-process `Engine`: the server lives in its own process tree, so its
scheduler children, signal handlers and CUDA context never mix with the trainer's; pause and
continue exist only on the server; and a crashed engine is an HTTP error, not a dead trainer.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from r1mega.config.sglang_schema import SGLangConfig
from r1mega.rollout.sglang.client import SGLangClient

# Versions whose API this adapter was written against (read from 0.5.23's source): the
# weight-update session (begin/end_weight_update) it relies on appeared in 0.5.21.
SUPPORTED = ("0.5.21", "0.5.22", "0.5.23")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_version(version: Optional[str] = None) -> str:
    """The installed sglang version, or a clear error when it is missing or not supported."""
    if version is None:
        try:
            import sglang
        except ImportError as err:
            raise RuntimeError(f"rollout.engine=sglang needs sglang {SUPPORTED[-1]} "
                               f"(pip install 'r1mega[sglang]'): {err}") from None
        version = getattr(sglang, "__version__", "unknown")
    base = version.split("+")[0]
    if not any(base == v or base.startswith(v + ".post") for v in SUPPORTED):
        raise RuntimeError(f"sglang {version} is installed; r1mega's SGLang engine supports {', '.join(SUPPORTED)} "
                           f"(it needs the weight-update session API of 0.5.21+)")
    return version


def server_command(model_dir: str, g: SGLangConfig, base_gpu_id: int, host: str, port: int, dtype: str, seed: int,
                   memory_saver: bool, server_args: Optional[Dict] = None) -> List[str]:
    """The launch_server command line of one engine (weights arrive by sync, so load_format=dummy);
    `server_args` (default rollout.sglang.server_args) become its flags and options."""
    args = {"model-path": model_dir, "tp-size": g.tp, "base-gpu-id": base_gpu_id,
            "mem-fraction-static": g.mem_fraction_static, "host": host, "port": port,
            "dtype": DTYPES[dtype], "random-seed": seed, "load-format": "dummy"}
    flags = ["skip-tokenizer-init"] + (["enable-memory-saver"] if memory_saver else [])
    for key, value in (g.server_args if server_args is None else server_args).items():
        key = str(key).replace("_", "-")
        if value is True:
            flags.append(key)
        elif value is not False and value is not None:  # 0 is a value, not "off"
            args[key] = value
    cmd = [sys.executable, "-m", "sglang.launch_server"]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return cmd + [f"--{f}" for f in flags]


def write_model_dir(folder: Path, hf_config: Dict) -> str:
    """An HF model folder holding only config.json: enough for a dummy-weight server."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(hf_config, indent=2))
    tmp.replace(folder / "config.json")
    return str(folder)


def _die_with_parent() -> None:
    # A server in its own session outlives a killed trainer and keeps its GPU memory; Linux's
    # parent-death signal stops it (SGLang's launcher then stops its scheduler children).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerProcess:
    """One engine's server process, its log file and its client."""

    def __init__(self, cmd: List[str], log_path: Path, url: str, timeout_s: float):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent,
                                     env={**os.environ, "SGLANG_RETURN_ORIGINAL_LOGPROB": "0"})
        self.client = SGLangClient(url, timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            self.client.wait_ready(timeout_s, alive=lambda: self.proc.poll() is None)
        except Exception as err:
            self.stop()
            raise RuntimeError(f"{err}; server log: {self.log_path}") from None

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its scheduler children
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
