#!/usr/bin/env python3
"""Makes samples/chest-cr-sample.dcm, the bundled demo radiograph.

Source: RG1_UNCR.dcm of the NEMA WG04 compression test set (a real adult PA
chest CR, MONOCHROME1, 15 bits stored; as redistributed by pydicom-data).
Reduced 4x by block averaging to 488 x 460 so the repository stays small,
given fake patient identifiers (so privacy tests have something to look for),
then compressed JPEG 2000 lossless by GDCM (`gdcmconv --j2k`).

  make_sample.py RG1_UNCR.dcm OUT.dcm   (then: gdcmconv --j2k OUT.dcm OUT.dcm)
"""
import sys

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def main():
    src, out = sys.argv[1], sys.argv[2]
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array.astype(np.float64)
    h, w = (arr.shape[0] // 4) * 4, (arr.shape[1] // 4) * 4
    small = arr[:h, :w].reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    ds.PixelData = np.rint(small).astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = small.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "OXBOX^SAMPLE^FAKE"
    ds.PatientID = "OXBOX-FAKE-0001"
    ds.PatientBirthDate = "19700101"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["oxbox-sample-rg1"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)


if __name__ == "__main__":
    main()
