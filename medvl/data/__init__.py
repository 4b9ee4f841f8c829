"""Training data: source formats in, normalized JSONL records out.

- `schema.py`: the normalized record (the JSONL line format) and `Rejection`.
- `formats.py`: one reader per source format, format detection.
- `containers.py`: a file's container read sample by sample (streamed JSON array, JSONL, JSON object, CSV).
- `images.py`: PNG/JPEG/TIFF/BMP/WebP and DICOM to 8-bit RGB; resolution policies and visual-token counts.
- `checks.py`: per-sample validation and repair (placeholders, image paths, decodability, limits).
- `prepare.py`: the `prepare-data` driver: streaming, parallel, resumable shards, quarantine, manifest.
- `collate.py`: chat template + loss mask, image-safe truncation, exact lengths, padding-free packing.
- `dataset.py`: prepared shards at training time: index, encoding in workers, the resumable batch plan.
- `inspect.py`: one prepared sample as the model sees it.

Nothing is re-exported here: `import medvl.data` stays free of Pillow, numpy and pydicom, so the CLI's
`--help` and completion stay fast. Import the module you need.
"""
