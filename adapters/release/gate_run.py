"""`cartridge gate NAME@vN`: the store's versions turned into gate suites, and the verdict kept with the version.

Learned: the candidate's own held-out rows (its test files, else its validation files). Retained: the
held-out rows of every version it descends from and of the live version's line, and any suites the
user names. The report goes into `<version>/gate/against-v<live>/` once, written in a staging
directory and renamed, with a verdict that records the sha256 of the candidate's manifest, of the live
version's and of report.json, so `release` can tell that the report speaks of exactly these bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..formats.file_modes import follow_umask
from ..formats.hashing import file_sha256
from ..formats.store_layout import GATE_DIR, StoredVersion, StoreError, VersionRef
from ..formats.live_pointer import now
from ..store.versions import AdapterStore
from .lifecycle import REPORT_FILE, VERDICT_FILE, Verdict, gate_dir, live_version, read_verdict


@dataclass(frozen=True, slots=True)
class GateOutcome:
    verdict: Verdict
    directory: Path
    earlier: bool  # the report was already there: a version is gated against one live version once


def suites_for(store: AdapterStore, candidate: StoredVersion, live: StoredVersion | None,
               extra: list[tuple[str, Path]]):
    from ..gate import GateSuite

    learned = candidate.held_out_files()
    if not learned:
        raise StoreError(f"{candidate.ref} holds no held-out rows (test_data or val_data) to gate what it learned")
    suites = [GateSuite(f"{candidate.ref}:{f.path.name}", f.path, "learned") for f in learned]
    earlier = {v.number: v for v in store.lineage(candidate)}
    if live is not None:
        earlier.update({v.number: v for v in (live, *store.lineage(live)) if v.number != candidate.number})
    for number in sorted(earlier):
        suites += [GateSuite(f"{earlier[number].ref}:{f.path.name}", f.path, "retained")
                   for f in earlier[number].held_out_files()]
    suites += [GateSuite(name, path, "retained") for name, path in extra]
    return suites


def gate_version(store: AdapterStore, ref: VersionRef, gate_file: Path | None,
                 extra: list[tuple[str, Path]]) -> GateOutcome:
    from ..gate import GateConfig, run_gate

    if ref.number is None:
        raise StoreError(f"name the version to gate, such as {ref.name}@v{max(store.version_numbers(ref.name), default=1)}")
    candidate = store.open(ref)
    live = live_version(store, ref.name)
    if live is not None and live.number == candidate.number:
        raise StoreError(f"{ref} is live; gate a new version against it")
    against = live.number if live else None
    final = gate_dir(candidate, against)
    existing = read_verdict(candidate, against, live)
    if existing is not None:
        return GateOutcome(existing, final, earlier=True)
    recorded = candidate.manifest["train_config"].get("gate_file")
    config = GateConfig.load(gate_file or (Path(recorded) if recorded else None))
    suites = suites_for(store, candidate, live, extra)
    (candidate.path / GATE_DIR).mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=candidate.path / GATE_DIR))
    try:
        report = run_gate(candidate.path, live.path if live else None, candidate.manifest["base"]["path"], suites,
                          config, staging)
        summary = report.summary()
        raw = {"candidate": str(ref), "candidate_manifest_sha256": candidate.manifest_sha256,
               "against": against, "against_manifest_sha256": live.manifest_sha256 if live else None,
               "passed": report.passed, "report_sha256": file_sha256(staging / REPORT_FILE),
               "summary": summary, "time": now()}
        (staging / VERDICT_FILE).write_text(json.dumps(raw, indent=1))
        follow_umask(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another gate of the same pair finished first: its report stands (the gate is seeded).
            shutil.rmtree(staging, ignore_errors=True)
            return GateOutcome(read_verdict(candidate, against, live), final, earlier=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return GateOutcome(Verdict(report.passed, against, raw["report_sha256"], summary, raw["time"]), final,
                       earlier=False)
