#!/usr/bin/env bash
# Rebuilds the ignored folder .gpu that run's carry takes to the device machine (bench/gpu_setup.sh
# uses it there). From the repo root, on a Debian 12 x86-64 machine with network to PyPI and the
# Debian mirrors: `bash bench/gpu_carry.sh` (seconds to a minute). Idempotent: builds into a temp dir,
# verifies it there, then replaces .gpu. Needs no root (apt-get download works as any user; if the
# apt lists are missing it runs apt-get update, which does need root).
#   .gpu/whl        cp312 manylinux wheels pinned below (pip download --no-deps) plus botocore
#                   1.44.8+s3only: the real botocore wheel less the data of all services but those
#                   in BOTO_KEEP (16.9 MB -> 0.85 MB), version renamed so it is told apart.
#   .gpu/redis      Debian 12 redis-server (redis-tools' redis-check-rdb, which redis-server links
#                   to) and its shared libraries, from apt-get download + dpkg-deb -x.
#   .gpu/tesseract  Debian 12 tesseract 5.3 + eng.traineddata + libraries; libcurl.so.4 and
#                   libarchive.so.13 are stubs built with gcc from bench/gpu_carry/ (README.txt).
# Files are copied dereferenced: .gpu holds no symlinks. Size must stay under LIMIT (run's carry
# takes 64 MiB in all, the tracked repo included).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LIMIT=60000000

# Wheels: the set the device image lacks (or has older), pinned to requirements/worker.txt.
# The image has torch, transformers 5.17 (so tokenizers>=0.23.1, huggingface-hub 1.x, hf-xet,
# typer, rich, safetensors, regex, tqdm, filelock, fsspec), numpy, pillow, scipy, accelerate, pyyaml.
# transformers 5.24 needs huggingface-hub>=1.31, whose 2.x needs httpx2 (-> httpcore2, truststore).
# Left out to stay under LIMIT: tokenizers==0.23.3 (3.4 MB; the image's >=0.23.1 already satisfies
# transformers 5.24's tokenizers>=0.23.1,<0.24) and hf-xet==1.8.0 (4.3 MB; only used to download
# from the Hub, and the device machine has no network).
WHEELS=(
  amqp==5.4.2 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 billiard==4.3.2
  boto3==1.44.8 celery==5.7.0 certifi==2026.10.19.post1 cffi==2.1.1 click==8.5.1
  click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 fastapi==0.165.0 h11==0.16.0
  httpcore==1.0.9 httpx==0.28.1 idna==3.20 jmespath==1.1.0 kombu==5.7.0 markdown-it-py==4.3.0
  mdurl==0.1.2 opentelemetry-api==1.45.2 packaging==26.3 platformdirs==4.14.9
  prometheus-client==0.26.0 prompt-toolkit==3.0.53 psutil==7.2.2 py-spy==0.4.3 pycparser==3.12
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 pygments==2.21.0
  pytesseract==0.3.13 python-dateutil==2.9.0.post0 python-dotenv==1.2.4 redis==8.1.0
  rich==15.0.0 s3transfer==0.19.3 six==1.17.0 soundfile==0.14.0 standardwebhooks==1.1.0
  starlette==1.10.0 typing-extensions==4.16.0 typing-inspection==0.4.5 tzlocal==5.4.5
  urllib3==2.8.0 uvicorn==0.54.0 vine==5.1.0 wcwidth==0.9.4
  transformers==5.24.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
)
BOTOCORE=1.44.8
BOTO_KEEP="s3 sts sso sso-oidc signin"

# Debian packages and the files taken from them (libraries by soname, found in the extracted tree).
REDIS_DEBS="redis-tools libatomic1 liblzf1 libjemalloc2 libsystemd0 libssl3 libstdc++6 libgcc-s1
  libcap2 libgcrypt20 liblzma5 libzstd1 liblz4-1 libgpg-error0"
REDIS_LIBS="libatomic.so.1 liblzf.so.1 libjemalloc.so.2 libsystemd.so.0 libssl.so.3 libcrypto.so.3
  libstdc++.so.6 libgcc_s.so.1 libcap.so.2 libgcrypt.so.20 liblzma.so.5 libzstd.so.1 liblz4.so.1
  libgpg-error.so.0"
TESS_DEBS="tesseract-ocr tesseract-ocr-eng libtesseract5 liblept5 libgomp1 libpng16-16
  libjpeg62-turbo libgif7 libtiff6 libwebpmux3 libwebp7 libopenjp2-7 zlib1g libzstd1 liblzma5
  liblerc4 libjbig0 libdeflate0"
TESS_LIBS="libtesseract.so.5 liblept.so.5 libgomp.so.1 libpng16.so.16 libjpeg.so.62 libgif.so.7
  libtiff.so.6 libwebpmux.so.3 libwebp.so.7 libopenjp2.so.7 libz.so.1 libzstd.so.1 liblzma.so.5
  libLerc.so.4 libjbig.so.0 libdeflate.so.0"

die() { echo "gpu_carry: $*" >&2; exit 1; }
WORK=$(mktemp -d /tmp/gpu-carry.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
NEW=$WORK/gpu
mkdir -p "$NEW/whl" "$NEW/redis/usr/bin" "$NEW/redis/lib" "$NEW/tesseract/bin" \
  "$NEW/tesseract/lib" "$NEW/tesseract/tessdata" "$NEW/tesseract/stub-src"

# 1. Wheels (cp312, manylinux x86-64), no dependency resolution: the list above is the whole set.
if [ -x "$ROOT/.venv/bin/pip" ]; then PIP=("$ROOT/.venv/bin/pip"); else PIP=(python3 -m pip); fi
PIPDL=(download -qq --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
echo "gpu_carry: downloading ${#WHEELS[@]} wheels + botocore==$BOTOCORE"
"${PIP[@]}" "${PIPDL[@]}" -d "$NEW/whl" "${WHEELS[@]}"
"${PIP[@]}" "${PIPDL[@]}" -d "$WORK/botocore" "botocore==$BOTOCORE"

# 2. botocore s3-only: drop botocore/data/<service>/ for services not in BOTO_KEEP (the top-level
#    data files stay), rename the dist-info and Version to $BOTOCORE+s3only, rewrite RECORD.
python3 - "$WORK/botocore/botocore-$BOTOCORE-py3-none-any.whl" "$NEW/whl" "$BOTOCORE" $BOTO_KEEP <<'EOF'
import base64, hashlib, sys, zipfile
src, out_dir, ver, *keep = sys.argv[1:]
local = ver + "+s3only"
old_di, new_di = f"botocore-{ver}.dist-info/", f"botocore-{local}.dist-info/"
out = f"{out_dir}/botocore-{local}-py3-none-any.whl"
record, kept = [], set()
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        name = info.filename
        parts = name.split("/")
        if name.endswith("/") or name == old_di + "RECORD":
            continue
        if parts[:2] == ["botocore", "data"] and len(parts) > 3:
            if parts[2] not in keep:
                continue
            kept.add(parts[2])
        data = zin.read(info)
        if name.startswith(old_di):
            name = new_di + name[len(old_di):]
        if name == new_di + "METADATA":
            old = f"\nVersion: {ver}\n".encode()
            assert old in data, "botocore METADATA has no Version line"
            data = data.replace(old, f"\nVersion: {local}\n".encode(), 1)
        zi = zipfile.ZipInfo(name, info.date_time)
        zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
        zout.writestr(zi, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{new_di}RECORD,,")
    zout.writestr(new_di + "RECORD", "\n".join(record) + "\n")
missing = set(keep) - kept
assert not missing, f"botocore {ver} has no data for {missing}"
print(f"gpu_carry: built {out.rsplit('/', 1)[1]} (data kept: {', '.join(sorted(kept))})")
EOF

# One wheel per project, and every pinned project present.
python3 - "$NEW/whl" "${WHEELS[@]}" botocore <<'EOF'
import collections, os, re, sys
d, *specs = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
names = collections.Counter(norm(f.split("-")[0]) for f in os.listdir(d) if f.endswith(".whl"))
want = {norm(s.split("==")[0]) for s in specs}
dup = [n for n, c in names.items() if c > 1]
assert not dup, f"more than one wheel for {dup}"
assert set(names) == want, f"missing {want - set(names)}, unexpected {set(names) - want}"
print(f"gpu_carry: {len(names)} wheels, one per project")
EOF

# 3. Debian packages: download (current bookworm versions) and unpack into one tree.
mkdir -p "$WORK/debs" "$WORK/root"
# shellcheck disable=SC2086  # package lists are word lists
PKGS=$(printf '%s\n' $REDIS_DEBS $TESS_DEBS | sort -u)
# shellcheck disable=SC2086
if ! (cd "$WORK/debs" && apt-get download -q $PKGS >/dev/null 2>"$WORK/apt.err"); then
  [ "$(id -u)" = 0 ] || { cat "$WORK/apt.err" >&2; die "apt-get download failed (apt-get update needs root)"; }
  apt-get update -q >/dev/null
  # shellcheck disable=SC2086
  (cd "$WORK/debs" && apt-get download -q $PKGS >/dev/null)
fi
for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done
echo "gpu_carry: unpacked $(ls "$WORK"/debs/*.deb | wc -l) .deb files:" \
  "$(cd "$WORK/debs" && ls | sed 's/_amd64.deb$\|_all.deb$//; s/%3a/:/' | tr '\n' ' ')"

lib() {  # copy soname $1 (dereferenced: the real file under the soname) into dir $2
  local d
  for d in usr/lib/x86_64-linux-gnu lib/x86_64-linux-gnu; do
    if [ -e "$WORK/root/$d/$1" ]; then cp -L "$WORK/root/$d/$1" "$2/$1"; return; fi
  done
  die "no $1 in the unpacked packages"
}
cp -L "$WORK/root/usr/bin/redis-check-rdb" "$NEW/redis/usr/bin/redis-server"
for l in $REDIS_LIBS; do lib "$l" "$NEW/redis/lib"; done
cp -L "$WORK/root/usr/bin/tesseract" "$NEW/tesseract/bin/tesseract"
for l in $TESS_LIBS; do lib "$l" "$NEW/tesseract/lib"; done
cp -L "$WORK/root/usr/share/tesseract-ocr/5/tessdata/eng.traineddata" "$NEW/tesseract/tessdata/"

# 4. libcurl / libarchive stand-ins (see bench/gpu_carry/README.txt), sources kept beside them.
S=$ROOT/bench/gpu_carry
cp "$S/README.txt" "$S/archive_stub.c" "$S/curl_stub.c" "$S/curl_stub.map" "$NEW/tesseract/stub-src/"
gcc -O2 -fPIC -shared -s -Wl,-soname,libcurl.so.4 -Wl,--version-script="$S/curl_stub.map" \
  -o "$NEW/tesseract/lib/libcurl.so.4" "$S/curl_stub.c"
gcc -O2 -fPIC -shared -s -Wl,-soname,libarchive.so.13 \
  -o "$NEW/tesseract/lib/libarchive.so.13" "$S/archive_stub.c"

# 5. Checks on the new tree before it replaces .gpu: no symlinks, size, every library resolved
#    from the carried folder except the base system ones any Linux has.
[ -z "$(find "$NEW" -type l)" ] || die "symlinks in the new tree"
size=$(du -sb "$NEW" | cut -f1)
[ "$size" -lt "$LIMIT" ] || die "new tree is $size bytes, over $LIMIT"
ldd_check() {  # lib dir, binary, regex of sonames allowed from the system
  local out outside
  out=$(env -i LD_LIBRARY_PATH="$1" ldd "$2")
  ! grep -q 'not found' <<<"$out" || die "$2: $(grep 'not found' <<<"$out")"
  outside=$(awk '$2 == "=>" {print $1, $3}' <<<"$out" | grep -v " $1/" | cut -d' ' -f1 | grep -Ev "$3" || true)
  [ -z "$outside" ] || die "$2 takes from the system: $outside"
}
ldd_check "$NEW/redis/lib" "$NEW/redis/usr/bin/redis-server" '^lib(c|m)\.so\.6$'
ldd_check "$NEW/tesseract/lib" "$NEW/tesseract/bin/tesseract" '^(lib(c|m)\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1)$'

# 6. Replace .gpu.
rm -rf "$ROOT/.gpu"
mv "$NEW" "$ROOT/.gpu"
echo "gpu_carry: .gpu rebuilt"

# 7. Verify in place.
find .gpu -type l | grep . && die "symlinks in .gpu"
du -sb .gpu
LD_LIBRARY_PATH=.gpu/redis/lib .gpu/redis/usr/bin/redis-server --version
PY=
for p in "$ROOT/.venv/bin/python" python3; do
  if "$p" -c 'import PIL' 2>/dev/null; then PY=$p; break; fi
done
if [ -z "$PY" ]; then  # no Pillow here: a throwaway venv with it
  python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q pillow || die "no Pillow for the OCR check"
  PY=$WORK/venv/bin/python
fi
"$PY" - "$WORK/img.png" <<'EOF'
import sys
from PIL import Image, ImageDraw, ImageFont
try:
    font = ImageFont.load_default(size=48)
except TypeError:  # Pillow < 10.1
    font = ImageFont.load_default()
img = Image.new("L", (640, 120), 255)
ImageDraw.Draw(img).text((20, 30), "INVOICE 12345", fill=0, font=font)
img.save(sys.argv[1])
EOF
ocr=$(env -i LD_LIBRARY_PATH="$ROOT/.gpu/tesseract/lib" TESSDATA_PREFIX="$ROOT/.gpu/tesseract/tessdata" \
  .gpu/tesseract/bin/tesseract "$WORK/img.png" - 2>/dev/null)
echo "tesseract OCR: $ocr"
grep -q 'INVOICE 12345' <<<"$ocr" || die "OCR did not read INVOICE 12345"
echo "gpu_carry: OK"
