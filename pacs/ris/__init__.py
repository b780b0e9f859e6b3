"""The RIS side: imaging orders, the Modality Worklist fed by them, and MPPS progress reports."""
