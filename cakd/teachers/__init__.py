"""Teacher families, one module each, registered into :mod:`.registry` when imported: the
package imports the built-in ones, in the order ``--teacher`` lists them."""
from . import vit, swin, cnn  # noqa: F401  (vit first: its names come first)
