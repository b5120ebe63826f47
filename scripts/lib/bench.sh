# Shared by scripts/bench-*: sourced, not run. Expects $root (the repo) to be set.

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
mib() { echo "scale=1; $1 / 1048576" | bc -l; }
ratio() { printf "%.2f" "$(echo "scale=4; $1 / $2" | bc -l)"; }
min() { echo "if ($1 < $2) $1 else $2" | bc -l; }

# moto keeps objects in memory and slows as it fills: every timed step gets a fresh
# emulator, so no method pays for another's objects. Sets $aws and the PILOTLIGHT_* env.
fresh_stack() {
  "$root/scripts/local-stack" stop >/dev/null 2>&1 || true
  PILOTLIGHT_BUCKET=bench "$root/scripts/local-stack" start >/dev/null 2>&1
  # shellcheck disable=SC1091
  . "$root/.local/stack.env"
  aws=("$root/.venv/tools/bin/aws" --endpoint-url "$PILOTLIGHT_ENDPOINT_URL")
}

stop_stack() { "$root/scripts/local-stack" stop >/dev/null 2>&1 || true; }

# Total size of the objects under a prefix of the bench bucket.
stored() { "${aws[@]}" s3 ls --recursive --summarize "s3://$PILOTLIGHT_BUCKET/$1" | awk '/Total Size:/{print $3}'; }

# The seed's extract step: the changed areas of disk.raw, listed in changes.txt, as
# offset-named files in delta/, one process, each file fsynced (as its VDDK sample).
seed_extract() { # work
  rm -rf "$1/delta"; mkdir "$1/delta"
  python3 - "$1" <<'PY'
import os, sys
work = sys.argv[1]
fd = os.open(f"{work}/disk.raw", os.O_RDONLY)
for line in open(f"{work}/changes.txt"):
    if not line.split():
        continue
    off, length = map(int, line.split())
    with open(f"{work}/delta/{off}", "wb") as out:
        out.write(os.pread(fd, length, off))
        os.fsync(out.fileno())
PY
}

# A disk of $2 MiB with changes listed in changes.txt. $3 is the mix: every other MiB
# changed, "half-zero" (half of the changed MiBs zero, a quarter random, a quarter text)
# or "data" (half random, half text); or "scattered": extents of 64 or 128 KiB of random
# bytes with gaps of 1 to 2 MiB between them, no zeroes (as changed-block tracking
# reports scattered writes); or "random" / "text": extents of 64 KiB to 2 MiB, gaps of
# 1 to 2 MiB, of random bytes / log-like text.
make_disk() { # work mib mix
  python3 - "$1" "$2" "$3" <<'PY'
import random, sys
work, mib, mix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
M = 1 << 20
rng = random.Random(7)
line = b"2026-11-23 INFO request served in 12 ms path=/api/v1/items id=%08d\n"
with open(f"{work}/disk.raw", "wb") as d, open(f"{work}/changes.txt", "w") as lst:
    d.truncate(mib * M)
    if mix in ("random", "text"):
        # Extents of 64 KiB to 2 MiB with gaps of 1 to 2 MiB: random bytes (nothing to
        # compress: media, archives, encrypted files) or log-like text.
        off = 0
        k = 0
        while True:
            off += rng.randrange(M, 2 * M, 64 * 1024)
            n = rng.randrange(64 * 1024, 2 * M + 1, 64 * 1024)
            if off + n > mib * M:
                break
            if mix == "random":
                data = rng.randbytes(n)
            else:
                data = b"".join(line % (k * 100000 + j) for j in range(n // len(line) + 1))[:n]
            k += 1
            d.seek(off); d.write(data)
            lst.write(f"{off} {n}\n")
            off += n
        sys.exit(0)
    if mix == "scattered":
        off = 0
        while True:
            off += rng.randrange(M, 2 * M, 64 * 1024)
            n = rng.choice((64, 128)) * 1024
            if off + n > mib * M:
                break
            d.seek(off); d.write(rng.randbytes(n))
            lst.write(f"{off} {n}\n")
            off += n
        sys.exit(0)
    for i in range(mib // 2):
        off = i * 2 * M
        kind = i % 4 if mix == "half-zero" else 2 + i % 2
        if kind in (0, 1):
            data = bytes(M)
        elif kind == 2:
            data = rng.randbytes(M)
        else:
            data = b"".join(line % (i * 100000 + j) for j in range(M // len(line) + 1))[:M]
        d.seek(off); d.write(data)
        lst.write(f"{off:>15} {M:>15}  \n\n")
PY
}

# Runs a command, its CPU time (user + sys, seconds) into $cpu. Output as the command's.
cpu_timed() {
  local f; f=$(mktemp)
  /usr/bin/time -f "%U %S" -o "$f" "$@"
  local rc=$?
  cpu=$(awk '{print $1 + $2}' "$f"); rm -f "$f"
  return $rc
}

# CPU-seconds per GiB of changed bytes: cpu_per_gib SECONDS BYTES.
cpu_per_gib() { printf "%.2f" "$(echo "scale=4; $1 * 1073741824 / $2" | bc -l)"; }
