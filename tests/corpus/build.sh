#!/usr/bin/env bash
# Builds the ingest test corpus under tests/.corpus (or $OXBOX_CORPUS):
#  1. the real DICOM files of pydicom's test set and the NEMA WG04 set
#     (installed by shared/reference/setup.sh);
#  2. RG1 (a real adult PA chest CR) re-encoded by dcmtk and GDCM into every
#     transfer syntax the box reads, plus derived layouts (no preamble, no
#     file meta, 8/12-bit, signed);
#  3. the reference implementation's output for every file (manifest.jsonl).
# Idempotent: a finished corpus (stamp file) is reused.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
shared=${OXBOX_SHARED:-$root/../shared}
out=${OXBOX_CORPUS:-$root/tests/.corpus}
stamp="$out/.complete-v2"
[ -f "$stamp" ] && { echo "corpus: $out (cached)"; exit 0; }

eval "$(bash "$shared/reference/setup.sh" | sed 's/^/ref_/')"
py=$ref_python
wg04=$ref_wg04
pyd=$ref_pydicom_test_files

rm -rf "$out"
mkdir -p "$out/encoded" "$out/derived" "$out/reference"
rg1="$wg04/RG1_UNCR.dcm"

"$py" "$here/derive.py" "$rg1" "$out/derived"
d="$out/derived"; e="$out/encoded"

# dcmtk re-encodings of RG1 (15 bits stored) and its derived 8/12-bit copies.
dcmconv +ti "$rg1" "$e/rg1_implicit_le.dcm"
dcmconv +te "$rg1" "$e/rg1_explicit_le.dcm"
dcmconv +tb "$rg1" "$e/rg1_explicit_be.dcm"
dcmconv +td "$rg1" "$e/rg1_deflated.dcm"
dcmcrle "$rg1" "$e/rg1_rle16.dcm"
dcmcrle "$d/rg1_8bit.dcm" "$e/rg1_rle8.dcm"
dcmcjpeg +eb "$d/rg1_8bit.dcm" "$e/rg1_jpeg_baseline.dcm"
dcmcjpeg +ee "$d/rg1_12bit.dcm" "$e/rg1_jpeg_extended12.dcm"
dcmcjpeg +e1 "$rg1" "$e/rg1_jpeg_lossless_sv1.dcm"
dcmcjpeg +el +sv 6 "$rg1" "$e/rg1_jpeg_lossless_p14_sv6.dcm"
dcmcjpeg +e1 "$d/rg1_8bit.dcm" "$e/rg1_8bit_jpeg_lossless_sv1.dcm"
dcmcjpls +el "$rg1" "$e/rg1_jpegls_lossless.dcm"
dcmcjpls +en +md 2 "$rg1" "$e/rg1_jpegls_near_lossless.dcm"
dcmcjpls +el "$d/rg1_signed.dcm" "$e/rg1_signed_jpegls_lossless.dcm"
# GDCM re-encodings.
gdcmconv --j2k "$rg1" "$e/rg1_j2k_lossless_gdcm.dcm"
gdcmconv --j2k --lossy -q 40 "$rg1" "$e/rg1_j2k_lossy_gdcm.dcm"
gdcmconv --jpegls "$rg1" "$e/rg1_jpegls_gdcm.dcm"
gdcmconv --rle "$rg1" "$e/rg1_rle_gdcm.dcm"
gdcmconv --jpeg "$d/rg1_12bit.dcm" "$e/rg1_12bit_jpeg_lossless_gdcm.dcm"
gdcmconv --j2k "$d/rg1_signed.dcm" "$e/rg1_signed_j2k_gdcm.dcm"
gdcmconv -w --deflated "$rg1" "$e/rg1_deflated_gdcm.dcm" || true

{
  find "$wg04" -maxdepth 1 -name '*.dcm'
  find "$pyd" -maxdepth 1 -name '*.dcm'
  find "$e" "$d" -name '*.dcm'
  find "$root/samples" -name '*.dcm'
} | sort > "$out/files.txt"
"$py" "$here/reference_outputs.py" "$shared/reference" "$out/reference" \
  < "$out/files.txt" > "$out/manifest.jsonl"
echo "corpus: $(wc -l < "$out/files.txt") files, $(grep -c '"status": "ok"' "$out/manifest.jsonl") decoded by the reference" 
touch "$stamp"
