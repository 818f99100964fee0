#!/usr/bin/env python3
"""Derives test inputs from RG1_UNCR.dcm (NEMA WG04 chest CR) that the
re-encoders need or that exercise file layouts:

  rg1_8bit.dcm        8 bits stored/allocated (for JPEG baseline, RLE 8-bit)
  rg1_12bit.dcm       12 bits stored in 16 (for JPEG extended 12-bit)
  rg1_no_preamble.dcm file meta group first: no preamble, no DICM prefix
  rg1_no_meta.dcm     bare data set, implicit VR LE, no file meta group
  rg1_signed.dcm      Pixel Representation 1, with a rescale and padding

The pixel values are RG1's own, shifted down; windows are scaled to match,
so the images stay real chest radiographs.

  derive.py RG1_UNCR.dcm OUT_DIR
"""
import copy
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


def with_bits(ds, bits, allocated, shift):
    out = copy.deepcopy(ds)
    arr = ds.pixel_array.astype(np.uint32) >> shift
    dtype = np.uint8 if allocated == 8 else np.uint16
    out.BitsAllocated = allocated
    out.BitsStored = bits
    out.HighBit = bits - 1
    out.PixelData = arr.astype(dtype).tobytes()
    out["PixelData"].VR = "OB" if allocated == 8 else "OW"
    scale = 2 ** shift
    out.WindowCenter = float(ds.WindowCenter) / scale
    out.WindowWidth = float(ds.WindowWidth) / scale
    return out


def main():
    src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    with_bits(ds, 8, 8, 7).save_as(out_dir / "rg1_8bit.dcm", enforce_file_format=True)
    with_bits(ds, 12, 16, 3).save_as(out_dir / "rg1_12bit.dcm", enforce_file_format=True)

    raw = (out_dir / "rg1_12bit.dcm").read_bytes()
    (out_dir / "rg1_no_preamble.dcm").write_bytes(raw[132:])

    bare = copy.deepcopy(ds)
    del bare.file_meta
    bare.preamble = None
    pydicom.dcmwrite(out_dir / "rg1_no_meta.dcm", bare, implicit_vr=True, little_endian=True,
                     enforce_file_format=False)

    # Signed data with a modality rescale, a padding value and no window:
    # exercises sign handling, the modality LUT, padding and percentiles.
    signed = copy.deepcopy(ds)
    arr = ds.pixel_array.astype(np.int32) - 16384
    arr[:40, :] = -32768
    signed.PixelRepresentation = 1
    signed.BitsStored = 16
    signed.HighBit = 15
    signed.PixelData = arr.astype(np.int16).tobytes()
    signed.RescaleSlope = 0.5
    signed.RescaleIntercept = 100
    signed.PixelPaddingValue = -32768
    signed["PixelPaddingValue"].VR = "SS"
    del signed.WindowCenter
    del signed.WindowWidth
    signed.save_as(out_dir / "rg1_signed.dcm", enforce_file_format=True)


if __name__ == "__main__":
    main()
