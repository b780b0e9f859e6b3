"""DICOMweb (PS3.18): QIDO-RS, WADO-RS, STOW-RS and WADO-URI under /dicom-web and /wado."""
