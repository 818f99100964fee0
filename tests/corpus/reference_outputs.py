#!/usr/bin/env python3
"""Runs the reference preprocessing (shared/reference/cxr_reference.py) on
every file listed on stdin, in one process, and writes for each an .npy and a
line of the manifest (JSON lines): file, status ("ok" or "error"), voi, and
the reference's error where it refused or failed.

For lossy JPEG files (baseline, extended 12-bit) it also decodes the file
with dcmtk's dcmdjpeg (the IJG library) into an uncompressed twin and runs
the reference on that too ("ijg_twin_npy"): two conformant JPEG decoders may
round the inverse DCT differently by one stored value (ISO 10918-2 allows
it), so this separates decoder rounding from preprocessing differences.

  reference_outputs.py REFERENCE_DIR OUT_DIR < files.txt > manifest.jsonl
"""
import json
import subprocess
import sys
import hashlib
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")


LOSSY_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


def main():
    ref_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(ref_dir))
    import cxr_reference as ref  # noqa: E402

    out_dir.mkdir(parents=True, exist_ok=True)
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        key = hashlib.sha1(path.encode()).hexdigest()[:16]
        npy = out_dir / f"{key}.npy"
        row = {"file": path, "reference_npy": str(npy)}
        try:
            ds = ref.read(path)
            x, how = ref.preprocess(ds, 224)
            np.save(npy, x)
            row.update(status="ok", voi=how,
                       transfer_syntax=str(ds.file_meta.TransferSyntaxUID)
                       if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None)
            if row["transfer_syntax"] in LOSSY_JPEG:
                twin = out_dir / f"{key}.ijg.dcm"
                subprocess.run(["dcmdjpeg", path, str(twin)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                tx, _ = ref.preprocess(ref.read(str(twin)), 224)
                np.save(out_dir / f"{key}.ijg.npy", tx)
                row["ijg_twin_npy"] = str(out_dir / f"{key}.ijg.npy")
        except Exception as e:  # noqa: BLE001  (the reference may fail in any way)
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
