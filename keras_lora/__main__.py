"""`python -m keras_lora`: the keras-lora command line."""

import sys

from keras_lora_cli import main

sys.exit(main())
