"""One module per image file format, each defining ``FORMAT``; ``medctl.data.readers.FORMATS`` lists them."""
