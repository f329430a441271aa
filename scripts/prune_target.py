#!/usr/bin/env python3
"""Keeps a cargo target dir that outlives checkouts from filling the disk.

The libtorch and fuzz builds live under $SHOAL_HOME so their C++ and
instrumented builds are paid once per machine. Cargo never deletes
anything there, and every checkout at a new path (each CI run is one)
hashes the workspace crates afresh, so each run used to add a full set
of test binaries (400 MB each with libtorch) and incremental caches:
29 GB after a few weeks, until a CI run's linker died of a full disk.

This removes, in each `deps` folder, the outputs of workspace crates
(those whose dep-info names a relative source path; registry crates
are left alone) that a newer build of the same crate root and kind has
superseded. Builds made within an hour of the newest one are kept, so
two live variants of one target (clippy checks a lib with and without
cfg(test)) are not rebuilt every run. `incremental` folders go too: the
scripts build these dirs with CARGO_INCREMENTAL=0.

    scripts/prune_target.py DIR [--dry-run]
"""

import os
import re
import shutil
import sys

KEEP_WITHIN_S = 3600
DEP_INFO = re.compile(r"^([A-Za-z0-9_]+)-([0-9a-f]{16})\.d$")


def outputs_and_root(path):
    """The output files and the crate root named by a dep-info file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        line = f.readline()
    targets, _, deps = line.partition(": ")
    srcs = deps.split()
    return targets.split(), (srcs[0] if srcs else "")


def prune_deps(deps, dry_run):
    groups = {}
    for name in os.listdir(deps):
        m = DEP_INFO.match(name)
        if not m:
            continue
        path = os.path.join(deps, name)
        try:
            outs, root = outputs_and_root(path)
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        if not root or os.path.isabs(root):
            continue
        kinds = tuple(sorted(os.path.splitext(o)[1] for o in outs))
        key = (m.group(1), root, kinds)
        groups.setdefault(key, []).append((mtime, m.group(1), m.group(2)))
    freed = 0
    for builds in groups.values():
        newest = max(b[0] for b in builds)
        for mtime, crate, hash_ in builds:
            if newest - mtime <= KEEP_WITHIN_S:
                continue
            stem = f"{crate}-{hash_}"
            for name in os.listdir(deps):
                base = name[3:] if name.startswith("lib") else name
                if base == stem or base.startswith(stem + "."):
                    path = os.path.join(deps, name)
                    freed += os.path.getsize(path)
                    if not dry_run:
                        os.remove(path)
    return freed


def main():
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    dry_run = "--dry-run" in sys.argv[1:]
    if len(args) != 1:
        sys.exit(__doc__)
    target = args[0]
    if not os.path.isdir(target):
        return
    freed = 0
    for root, dirs, _files in os.walk(target):
        if "incremental" in dirs:
            inc = os.path.join(root, "incremental")
            for r, _d, fs in os.walk(inc):
                freed += sum(os.path.getsize(os.path.join(r, f)) for f in fs)
            if not dry_run:
                shutil.rmtree(inc, ignore_errors=True)
            dirs.remove("incremental")
        if os.path.basename(root) == "deps":
            freed += prune_deps(root, dry_run)
            dirs.clear()
    verb = "would free" if dry_run else "freed"
    print(f"prune_target: {verb} {freed / 1e9:.1f} GB in {target}")


if __name__ == "__main__":
    main()
