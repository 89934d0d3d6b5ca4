"""The chat app: Gradio UI over one `engine.decode.Engine`, plus the glue that turns engine events into
chat text, tinted tokens, tree drawings and stats lines. No tensor work happens here."""

from app.settings import AppOptions
from app.ui import build_ui, load_examples

__all__ = ["AppOptions", "build_ui", "load_examples"]
