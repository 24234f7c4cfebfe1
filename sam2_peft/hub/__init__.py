"""Sharing adapters on the Hugging Face Hub.

huggingface_hub gives its loggers their own stderr handler and still lets records propagate, so once an application
configures logging (the recipes call `logging.basicConfig`) every Hub warning is printed twice, plain and formatted.
Its own switch turns the propagation off: each Hub message is printed once, by its handler.
"""

from huggingface_hub.utils import logging as _hub_logging

_hub_logging.disable_propagation()
