"""`dockercomp coordinator serve` as a child process, for the Docker tests that run real jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT


class Coordinator:
    """`dockercomp coordinator serve` as a child process plus its CLI, on one database."""

    def __init__(self, url: str, workdir: Path, purge_after: float = 5.0) -> None:
        self.url = url
        self.purge_after = purge_after
        self.db = str(workdir / "coordinator.db")
        self.env = dict(os.environ, DOCKERCOMP_BROKER=url, DOCKERCOMP_DB=self.db)
        self.log_path = workdir / "coordinator.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dockercomp.coordinator", "serve", "--broker", self.url, "--db", self.db,
                 "--purge-after", str(self.purge_after)],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dockercomp.coordinator", *args], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"coordinator {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result.stdout

    def submit(self, function: str, args: list[list[Any]], path: Path) -> str:
        path.write_text("".join(json.dumps(a) + "\n" for a in args))
        return str(json.loads(self.cli("submit", function, str(path), "--json"))["job_id"])

    def progress(self, job: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("status", job, "--json"))
        return data

    def results(self, job: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.cli("results", job, "--format", "jsonl").splitlines() if line]

    def workers(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.cli("workers", "--json"))
        return rows
