"""A private project's description, as PyPI shows it: METADATA's Description and
Description-Content-Type rendered and sanitized by readme_renderer (warehouse's
utils/readme.py), and the renderings kept, bounded, so a page view renders nothing.

Pure except for the cache: the caller reads the METADATA bytes (off the loop) and
calls render_metadata() in a thread.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType


def _renderers() -> tuple[ModuleType, ModuleType, ModuleType]:
    """readme_renderer's markdown, rst and txt modules, imported on first use.

    They pull in docutils, Pygments and comrak: about 10 MiB in every worker
    that never renders a description (measured with ru_maxrss). Only a UI page
    view renders one, in a thread; a second import is a dictionary lookup.
    """
    import readme_renderer.rst
    import readme_renderer.txt

    with warnings.catch_warnings():
        # Without readme-renderer's [md] extra (comrak) it warns here and renders
        # nothing: Markdown then shows as plain text, with a note saying so.
        warnings.simplefilter("ignore", UserWarning)
        import readme_renderer.markdown
    return readme_renderer.markdown, readme_renderer.rst, readme_renderer.txt


# A METADATA file is at most 16 MiB (publish.py); rendering that much Markdown
# would hold a thread for seconds. PyPI's own descriptions are far smaller.
MAX_DESCRIPTION_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class Description:
    html: str  # sanitized by readme_renderer (nh3): safe to insert as markup
    content_type: str  # what was used to render it
    note: str | None = None  # why it is shown as text, or not at all


def _content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of Description-Content-Type; "" when absent."""
    if not value:
        return "", {}
    msg = email.message.Message()
    msg["content-type"] = value
    params = {k.lower(): str(v) for k, v in msg.get_params(failobj=[])[1:]}
    # email calls a type it cannot parse text/plain: plain text, as warehouse.
    return (msg.get_content_type() if value.strip() else ""), params


def render(text: str, content_type: str | None) -> Description:
    """warehouse's rule: no type or text/x-rst is reStructuredText, text/markdown
    Markdown (its `variant` parameter: GFM or CommonMark), text/plain and anything
    else plain text; what fails to render (rst errors, `raw` directives) falls back
    to plain text. Every path goes through readme_renderer's sanitizer."""
    markdown, rst, txt = _renderers()
    media, params = _content_type(content_type)
    media = media or "text/x-rst"
    rendered: str | None
    if media == "text/markdown":
        variant = params.get("variant", "GFM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rendered = markdown.render(text, variant=variant)
    elif media == "text/x-rst":
        rendered = rst.render(text)
    else:
        media = "text/plain"
        rendered = None
    note = None
    if rendered is None:
        if media != "text/plain":
            note = f"shown as plain text: it does not render as {media}"
        rendered = txt.render(text) or ""
        media = "text/plain"
    return Description(rendered, media, note)


def from_metadata(raw: bytes) -> tuple[str, str | None] | None:
    """(description, Description-Content-Type) from core metadata bytes; None when
    it has none. Metadata 2.1+ puts it in the body, older versions in a header
    whose continuation lines start with 8 spaces and a '|'."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    ctype = msg.get("Description-Content-Type")
    body = msg.get_payload()
    text = body if isinstance(body, str) and body.strip() else None
    if text is None:
        header = msg.get("Description")
        if header is None or not str(header).strip():
            return None
        lines = str(header).splitlines()
        text = "\n".join([lines[0], *(
            line[9:] if line.startswith("        |") else line.lstrip() for line in lines[1:]
        )])
    return text, str(ctype) if ctype is not None else None


def render_metadata(raw: bytes) -> Description | None:
    """The description a METADATA file carries, rendered; None when it has none.
    Blocking (CPU): call in a thread."""
    found = from_metadata(raw)
    if found is None:
        return None
    text, ctype = found
    if len(text.encode("utf-8", errors="replace")) > MAX_DESCRIPTION_BYTES:
        return Description("", ctype or "", f"not shown: larger than "
                           f"{MAX_DESCRIPTION_BYTES // 1024} KiB")
    return render(text, ctype)


class Renderings:
    """Rendered descriptions by the sha256 of their METADATA file (its bytes never
    change under that hash), least recently used out first, bounded in entries
    and in characters. Thread-safe: renders finish in worker threads."""

    def __init__(self, max_entries: int = 256, max_chars: int = 16 * 2**20) -> None:
        self._kept: OrderedDict[str, Description | None] = OrderedDict()
        self._chars = 0
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._lock = threading.Lock()

    def get(self, sha256: str) -> tuple[bool, Description | None]:
        """(found, description): a metadata file without a description is remembered too."""
        with self._lock:
            if sha256 not in self._kept:
                return False, None
            self._kept.move_to_end(sha256)
            return True, self._kept[sha256]

    def put(self, sha256: str, description: Description | None) -> None:
        size = len(description.html) if description is not None else 0
        if size > self._max_chars:
            return
        with self._lock:
            old = self._kept.pop(sha256, None)
            self._chars -= len(old.html) if old is not None else 0
            self._kept[sha256] = description
            self._chars += size
            while len(self._kept) > self._max_entries or self._chars > self._max_chars:
                _key, gone = self._kept.popitem(last=False)
                self._chars -= len(gone.html) if gone is not None else 0

    def __len__(self) -> int:
        return len(self._kept)
