"""The feature browser: a static site showing what each transcoder feature sees, where it writes, and its CLIP text labels.

`build_browser(source, dataset, out, ...)` is the entry point (`vitclt browse` on the command line);
see docs/browser.md for what the pages show and how the numbers are computed.
"""

from vitclt.browser.build import MARKER, BrowserError, browser_pages, build_browser

__all__ = ["MARKER", "BrowserError", "browser_pages", "build_browser"]
