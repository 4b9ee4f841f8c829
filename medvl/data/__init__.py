"""Training data: source formats in, normalized JSONL records out.

- `schema.py`: the normalized record (the JSONL line format) and `Rejection`.
- `formats.py`: the table of source formats, format detection, reading one file (InternVL meta included).
- `converters.py`: one converter per source format (raw sample -> record), `--columns` for CSV.
- `containers.py`: a file's container read sample by sample (streamed JSON array, JSONL, JSON object, CSV).
- `inputs.py`: what prepare-data reads: folders expanded, file-level failures, duplicate ids.
- `paths.py`: the root rule for every path that comes from data (prepare-data, train, eval, chat).
- `images.py`: PNG/JPEG/TIFF/BMP/WebP and DICOM to 8-bit RGB; resolution policies and visual-token counts.
- `checks.py`: per-sample validation and repair (placeholders, image paths, decodability, limits).
- `prepare.py`: the `prepare-data` driver: streaming, parallel, resumable shards, quarantine, manifest.
- `output.py`: the prepare-data output folder: fresh, resumed or replaced; nothing left behind a failure.
- `collate.py`: chat template + loss mask, image-safe truncation, exact lengths, padding-free packing.
- `dataset.py`: prepared shards at training time: verified against the manifest, indexed, encoded in workers,
  and the resumable batch plan.
- `inspect.py`: one prepared sample as the model sees it.

Nothing is re-exported here: `import medvl.data` stays free of Pillow, numpy and pydicom, so the CLI's
`--help` and completion stay fast. Import the module you need.
"""
