"""The tiny settings every test that trains starts from, written once (conftest re-exports
them): 16 px phantoms, a quarter-width simple_cnn, one epoch, no bootstrap."""

TINY: dict = {"backbone": "simple_cnn", "image_size": 16, "count": 120, "epochs": 1,
              "width": 0.25, "batch_size": 16, "n_bootstrap": 0, "progress": False}
# The same as CLI flags.
TINY_ARGS: list[str] = ["--backbone", "simple_cnn", "--image-size", "16", "--count", "120",
                        "--epochs", "1", "--width", "0.25", "--batch-size", "16",
                        "--n-bootstrap", "0", "--no-progress"]
