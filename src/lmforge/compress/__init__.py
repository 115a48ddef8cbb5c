"""lmforge.compress: make a trained model smaller or portable (stage kind "compress").

`lmforge compress quantize|export --model DIR --out DIR`: quantize writes an int8/int4 weight-only
model directory that reloads on its own (quantize); export writes ONNX (with KV-cache inputs and
outputs) and GGUF files (export). Every method writes compression.json: size on disk, decode
tokens/s and perplexity / bits-per-byte before and after (measure). Imports are lazy so
`import lmforge.compress` does not pull in torch.
"""
