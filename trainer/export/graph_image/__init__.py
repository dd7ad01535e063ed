"""The exported graph's image codec, in TensorFlow ops: encoded bytes -> the model's 32x32 RGB input.

It reproduces the gateway's Pillow preprocessing (serving/images.py, contract/preprocess.py) bit for
bit, so `serving_bytes` on TensorFlow Serving and the gateway feed the model the very same pixels.

* `decode`: any supported format -> RGB, side check, turned upright, resized (the whole path);
* `exif`: a JPEG's EXIF Orientation, read from the bytes and applied as `ImageOps.exif_transpose`;
* `pillow_resize`: Pillow 13's fixed-point BILINEAR resize to 32x32.
"""
