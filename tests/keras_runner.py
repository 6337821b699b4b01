"""Runs ``tests/keras_cases.py`` once per Keras backend, in a subprocess (Keras fixes its backend
at import), all the given cases in one go; the processes of the three backends start together on
first use. Each case prints its measurements as one JSON line; tests assert on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")


class CaseRunner:
    def __init__(self, cases_by_backend: dict[str, list[str]], timeout: float = 900):
        self.cases_by_backend = cases_by_backend
        self.timeout = timeout
        self._procs: dict[str, subprocess.Popen] = {}
        self._results: dict[str, dict] = {}

    def _start_all(self) -> None:
        if self._procs:
            return
        for backend, cases in self.cases_by_backend.items():
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
            env.pop("XLA_FLAGS", None)
            self._procs[backend] = subprocess.Popen([sys.executable, os.path.join(HERE, "keras_cases.py"), *cases],
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    env=env, cwd=HERE)

    def results(self, backend: str) -> dict:
        if backend not in self._results:
            self._start_all()
            proc = self._procs[backend]
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            cases = {}
            for line in out.splitlines():
                if line.startswith("CASE "):
                    r = json.loads(line[5:])
                    cases[r["case"]] = r
            self._results[backend] = {"cases": cases, "stderr": err, "returncode": proc.returncode}
        return self._results[backend]

    def case(self, backend: str, name: str) -> dict:
        run = self.results(backend)
        r = run["cases"].get(name)
        if r is None:
            pytest.fail(f"{backend}: case {name!r} did not report (exit {run['returncode']}):\n{run['stderr'][-4000:]}")
        if not r["ok"]:
            pytest.fail(f"{backend}: case {name!r} raised:\n{r['error']}")
        return r["result"]
