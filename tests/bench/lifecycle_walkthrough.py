"""The continual-release walk-through on the default model, with the real commands and a real server.

    python -m tests.bench.lifecycle_walkthrough --out runs/walkthrough

One adapter, `assistant`, learns three sample domains in sequence (records, then facts, then the staff
directory), each update continued from the live version with replay, gated against it, and released
only if it passed (`cartridge release` refuses the others, and the next update continues from what is
live). Then a deliberately harmful update (many steps at a high learning rate on eight narrow rows, no
replay) is gated and must be blocked, and its release refused. Last, `cartridge serve --store` serves the
live version to 16 streaming requests while `cartridge rollback` takes it back one version.

Every step is a `cartridge` command run as a user runs it; their output goes to OUT/logs/. Re-running
with the same OUT carries on: a version already in the store is not trained again, a gate already
reported prints its stored verdict, and the times measured the first time are kept in OUT/steps.json.
The figures table is printed and written to OUT/figures.md and OUT/figures.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from client.client import CartridgeClient, CartridgeError

from ..conftest import start_server

NAME = "assistant"
SAMPLES = Path(__file__).resolve().parents[2] / "adapters" / "sample_data"
# Micro-batches of 4, two to a step (8 rows): the same steps as batch 8 in half the activation memory.
COMMON = ["--batch-size", "4", "--gradient-accumulation", "2", "--max-seq-len", "256", "--general-eval-tokens", "1024"]
STREAMS = 16


@dataclass(frozen=True)
class Update:
    version: int
    domain: str
    flags: tuple[str, ...]        # training settings beyond COMMON
    harmful: bool = False


# records is a format (long rows, learned in three epochs); facts and directory are knowledge, memorised
# at a higher rate (the sample-domain demo reached 100 % on paraphrases in eight epochs). Continued runs
# replay earlier rows and general text. Six epochs of directory with half the earlier rows and 10 %
# general text forgot 5 of 60 facts and raised general-text perplexity 155 % (gate FAIL); five epochs
# with 80 % of the rows and 20 % general text forgot one, a fact none of whose three training wordings
# was drawn: directory replays every earlier row. On an unshared 2-core CPU a step of 8 rows takes 3 to 9 s.
DOMAINS = {
    "records": ("--epochs", "3", "--learning-rate", "1e-3", "--recall-items", "80"),
    "facts": ("--epochs", "6", "--learning-rate", "2e-3", "--general-replay-fraction", "0.1", "--recall-items", "180"),
    "directory": ("--epochs", "5", "--learning-rate", "2e-3", "--replay-fraction", "1",
                  "--general-replay-fraction", "0.2", "--recall-items", "135"),
}
# Narrow data, no replay, a rate a hundred times the continued default, 12 epochs: forgetting on purpose.
HARMFUL = ("--max-steps", "12", "--learning-rate", "1e-2", "--eval-every", "12", "--recall-items", "8",
           "--replay-fraction", "0", "--general-replay-fraction", "0")


def updates(domains: list[str]) -> list[Update]:
    """The domains in order as v1, v2, ..., then the harmful update."""
    found = [Update(i, domain, DOMAINS[domain]) for i, domain in enumerate(domains, start=1)]
    return found + [Update(len(domains) + 1, "narrow", HARMFUL, harmful=True)]


NARROW_ROWS = [{"instruction": f"What does the sign on door {n} say?", "input": "", "output": "Closed for repairs."}
               for n in range(1, 13)]


class Walkthrough:
    def __init__(self, out: Path, smoke: bool, domains: list[str]):
        self.out = out
        self.updates = updates(domains)
        self.smoke = smoke
        self.store = out / "store"
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps_file = out / "steps.json"
        self.steps = json.loads(self.steps_file.read_text()) if self.steps_file.is_file() else {}

    def cartridge(self, step: str, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        """Runs `cartridge ARGS --store STORE`, logs its output to logs/STEP.log, keeps its first wall time."""
        print(f"$ cartridge {' '.join(args)}", flush=True)
        log = self.logs / f"{step}.log"
        started = time.monotonic()
        # stdout is read back from the log, so a long step can be followed there while it runs.
        with open(log, "w") as out:
            code = subprocess.run([sys.executable, "-m", "client.cli", *args, "--store", str(self.store)],
                                  stdout=out, stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - started
        done = subprocess.CompletedProcess(code.args, code.returncode, log.read_text(), code.stderr)
        if done.returncode not in ok:
            raise SystemExit(f"{step} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        self.steps.setdefault(step, {"wall_s": round(wall, 1), "exit": done.returncode})
        self.steps_file.write_text(json.dumps(self.steps, indent=1))
        return done

    def data(self, domain: str) -> list[str]:
        folder = SAMPLES / domain
        if domain == "narrow":
            folder = self.out / "narrow"
            folder.mkdir(exist_ok=True)
            lines = [json.dumps(row) + "\n" for row in NARROW_ROWS]
            (folder / "train.jsonl").write_text("".join(lines[:8]))
            (folder / "val.jsonl").write_text("".join(lines[8:10]))
            (folder / "test.jsonl").write_text("".join(lines[10:]))
        return ["--data", str(folder / "train.jsonl"), "--val-data", str(folder / "val.jsonl"),
                "--test-data", str(folder / "test.jsonl")]

    def train(self, update: Update) -> None:
        if (self.store / NAME / f"v{update.version}" / "manifest.json").is_file():
            print(f"{NAME}@v{update.version} is in the store already", flush=True)
            return
        start = ["--from", NAME] if update.version > 1 else []
        done = self.cartridge(f"train-v{update.version}", "train", "--name", NAME, *start,
                              *self.data(update.domain), *COMMON, *update.flags, *(SMOKE if self.smoke else ()))
        assert f"wrote {NAME}@v{update.version}" in done.stdout, done.stdout[-2000:]

    def gate(self, update: Update) -> bool:
        step = f"gate-v{update.version}"
        if step in self.steps:
            # Gated on an earlier run, against the version live then; the live version may have moved since.
            return self.steps[step]["exit"] == 0
        done = self.cartridge(step, "gate", f"{NAME}@v{update.version}",
                              "--gate-file", str(self.out / "gate.yaml"), ok=(0, 1))
        print(done.stdout, flush=True)
        return done.returncode == 0

    def release(self, update: Update, passed: bool) -> None:
        if f"release-v{update.version}" in self.steps:
            return
        step, ref = f"release-v{update.version}", f"{NAME}@v{update.version}"
        if passed or (self.smoke and not update.harmful):
            # Two steps learn nothing: --smoke releases anyway, so the rollback under load is exercised too.
            forced = [] if passed else ["--force", "--reason", "walk-through --smoke"]
            print(self.cartridge(step, "release", ref, *forced).stdout)
        else:
            print(self.cartridge(step, "release", ref, ok=(1,)).stderr, flush=True)

    def rollback_under_load(self) -> dict:
        """16 streams on the live version; `cartridge rollback` mid-way; when the server serves the previous one."""
        if "rollback" in self.steps:
            return self.steps["rollback"]
        server = start_server("--store", str(self.store), "--max-batch-size", str(STREAMS + 4),
                              "--max-seq-len", "512")
        try:
            with CartridgeClient(server.address, timeout=600) as client:
                live = _live(client)
                previous_answers = _greedy(client, f"{NAME}@v{live - 1}")
                finished, failures = [], []

                def stream(i: int) -> None:
                    prompt = [{"role": "user", "content": f"Tell me about order {1000 + i} and who sits in room B2{i:02d}."}]
                    try:
                        pieces = list(client.generate_stream(messages=prompt, adapter=NAME, max_tokens=64,
                                                             temperature=0.8, seed=i))
                        finished.append(pieces[-1].finish_reason)
                    except CartridgeError as err:
                        failures.append(f"{err.code}: {err.message}")

                threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
                for thread in threads:
                    thread.start()
                time.sleep(3.0)  # every stream decoding
                started = time.monotonic()
                rolled = self.cartridge("rollback", "rollback", NAME, "--reason", "walk-through: rollback under load")
                command_s = time.monotonic() - started
                while _live(client) != live - 1:
                    time.sleep(0.01)
                switched_s, switched_at = time.monotonic() - started, datetime.now(timezone.utc)
                log = (self.store / NAME / "releases.jsonl").read_text().splitlines()
                moved_at = datetime.fromisoformat(json.loads(log[-1])["time"])
                for thread in threads:
                    thread.join()
                figures = {"from": live, "to": live - 1, "command": rolled.stdout.strip(),
                           "command_s": round(command_s, 3), "server_switched_s": round(switched_s, 3),
                           "pointer_to_server_s": round((switched_at - moved_at).total_seconds(), 3),
                           "streams": STREAMS, "completed": len(finished), "failures": failures,
                           "answers_match_pinned": _greedy(client, NAME) == previous_answers}
        finally:
            server.stop()
        self.steps["rollback"] = figures
        self.steps_file.write_text(json.dumps(self.steps, indent=1))
        return figures


def _live(client: CartridgeClient) -> int:
    return next(a.version for a in client.list_adapters() if a.name == NAME and a.live)


PROBES = ["Extract this order as JSON.\n\nOrder 4242 was placed by Ada Okafor on 2023-04-05 for 3 x desk lamp, "
          "to be shipped to Porto.", "What is the capital of Beldornu?", "Which team is Dorra Nuvin on?"]


def _greedy(client: CartridgeClient, adapter: str) -> list[str]:
    return [client.generate(messages=[{"role": "user", "content": p}], adapter=adapter, max_tokens=64).text
            for p in PROBES]


# --smoke: the same commands in a few minutes, to check the walk-through itself; its figures mean nothing.
SMOKE = ("--max-steps", "2", "--recall-items", "4", "--general-eval-tokens", "256")
SMOKE_GATE = "items: 8\ngeneral_text: {tokens: 256, max_perplexity_increase: 0.5}\ngeneral_sets: {sets: []}\n"
GATE_FILE = """\
# The walk-through's gate: the defaults, except that general-text perplexity may rise 50 % per update
# (a first full-strength adapter on a 135M base costs 25 % on its own; README, "Sample domains").
seed: 0
general_text: {max_perplexity_increase: 0.5}
"""


def figures(walk: Walkthrough) -> dict:
    """Read back from the store: training reports, gate reports, the rollback."""
    versions = {}
    for update in walk.updates:
        path = walk.store / NAME / f"v{update.version}"
        report = json.loads((path / "training_report.json").read_text())
        gates = sorted((path / "gate").glob("against-*/report.json"))
        gate = json.loads(gates[-1].read_text()) if gates else None
        versions[update.version] = {"domain": update.domain, "report": report, "gate": gate}
    rows = {}
    for number, v in versions.items():
        training = v["report"]["training"]
        checks = {c["name"]: c for c in v["gate"]["checks"]} if v["gate"] else {}
        learned = next((c for n, c in checks.items() if n.startswith("learned:")), None)
        rows[number] = {
            "domain": v["domain"], "train_wall_s": round(training["wall_time_s"], 1), "steps": training["steps"],
            "tokens_per_s": round(training["tokens_per_s"], 1),
            "recall": v["report"]["final"]["train_recall"],
            "held_out_accuracy": learned["changes"][0]["after"] if learned else None,
            "gate_passed": v["gate"]["passed"] if v["gate"] else None,
            "gate_failed": v["gate"]["failed"] if v["gate"] else None,
            "gate_wall_s": walk.steps.get(f"gate-v{number}", {}).get("wall_s"),
            "gate_duration_s": round(v["gate"]["duration_s"], 1) if v["gate"] else None,
            "general_perplexity": {c["name"]: c["verdict"] for c in checks.values() if c["kind"] == "general_text"},
        }
    # Each earlier released domain on the last released version against the version that learned it.
    released = [u.version for u in walk.updates if versions[u.version]["gate"]["passed"]]
    last_checks = {c["name"]: c for c in versions[released[-1]]["gate"]["checks"]} if released else {}
    retained = {}
    for update in walk.updates:
        if update.version not in released[:-1]:
            continue
        own = rows[update.version]["held_out_accuracy"]
        after = next(c for n, c in last_checks.items()
                     if n.startswith(f"retained:{NAME}@v{update.version}:"))["changes"][0]["after"]
        retained[update.domain] = {"own": own, "after": after, "change_points": round(100 * (after - own), 1)}
    return {"versions": rows, "retained_after_updates": retained, "rollback": walk.steps.get("rollback"),
            "steps": walk.steps}


def table(found: dict) -> str:
    v, lines = found["versions"], ["| figure | target | measured |", "| --- | --- | --- |"]
    for number, row in v.items():
        recall = row["recall"]
        label = f"v{number} {row['domain']}"
        lines.append(f"| {label}: training ({row['steps']} steps) | - | {row['train_wall_s']} s, "
                     f"{row['tokens_per_s']} tokens/s |")
        lines.append(f"| {label}: recall of trained items | ≥ 99 % | {100 * recall['exact_match']:.1f} % "
                     f"of {recall['items']} |")
        if row["held_out_accuracy"] is not None:
            kind = "paraphrase accuracy (test wordings)" if row["domain"] in ("facts", "directory") \
                else "held-out exact match (test)"
            target = "≥ 95 %" if row["domain"] in ("facts", "directory") else "-"
            lines.append(f"| {label}: {kind} | {target} | {100 * row['held_out_accuracy']:.1f} % |")
        verdict = "PASS" if row["gate_passed"] else f"FAIL ({', '.join(row['gate_failed'])})"
        expected = "FAIL" if number == max(v) else "PASS"
        lines.append(f"| {label}: gate | {expected} | {verdict} |")
        lines.append(f"| {label}: gate wall time (command) | ≤ 300 s | {row['gate_wall_s']} s |")
    for domain, r in found["retained_after_updates"].items():
        lines.append(f"| {domain} after all updates vs its own | within 1 point | {100 * r['own']:.1f} % -> "
                     f"{100 * r['after']:.1f} % ({r['change_points']:+.1f}) |")
    rb = found["rollback"]
    if rb:
        lines.append(f"| rollback v{rb['from']} -> v{rb['to']}: pointer moved -> server serving v{rb['to']} | ≤ 1 s | "
                     f"{rb['pointer_to_server_s']} s (from the command's start: {rb['server_switched_s']} s) |")
        lines.append(f"| rollback: failed requests of {rb['streams']} streams | 0 | {len(rb['failures'])} "
                     f"({rb['completed']} completed) |")
        lines.append(f"| rollback: greedy answers equal {NAME}@v{rb['to']}'s | yes | "
                     f"{'yes' if rb['answers_match_pinned'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help=f"sample domains to learn in order (default: {','.join(DOMAINS)})")
    parser.add_argument("--smoke", action="store_true", help="2 steps a version and a small gate: checks the script")
    args = parser.parse_args()
    domains = args.domains.split(",")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        parser.error(f"--domains: unknown {unknown}; choose among {list(DOMAINS)}")
    out = args.out.resolve()
    walk = Walkthrough(out, args.smoke, domains)
    (out / "gate.yaml").write_text(SMOKE_GATE if args.smoke else GATE_FILE)
    for update in walk.updates:
        walk.train(update)
        passed = walk.gate(update)
        walk.release(update, passed)
    print(walk.cartridge("versions", "versions", NAME).stdout, flush=True)
    walk.rollback_under_load()
    print(walk.cartridge("versions-after", "versions", NAME).stdout, flush=True)
    found = figures(walk)
    (out / "figures.json").write_text(json.dumps(found, indent=1))
    text = table(found)
    (out / "figures.md").write_text(text + "\n")
    print(text)
    print(f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; logs in {walk.logs}")


if __name__ == "__main__":
    main()
