"""Real English text that every machine has: the Python standard library's docstrings.

The .py files of a fixed, sorted list of stdlib modules are parsed with ``ast``
(nothing is imported, so no side effects), and every module, class and function
docstring becomes text. The result depends only on the Python minor version,
never on the machine, the working directory or PYTHONHASHSEED.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass

# Pure-Python modules with prose docstrings, present from Python 3.10 on and in
# the core stdlib package of common distributions (so not tkinter/turtle). A
# module whose file is missing (removed in a later Python) is reported, not skipped silently.
STDLIB_MODULES = (  # sorted
    "_collections_abc", "_pydecimal", "_pyio", "abc", "argparse", "ast",
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.protocols", "asyncio.queues", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "asyncio.transports", "base64", "bdb", "bisect", "bz2", "calendar",
    "cmd", "code", "codecs", "codeop", "collections", "colorsys", "compileall",
    "concurrent.futures._base", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "contextvars", "copy",
    "copyreg", "csv", "dataclasses", "datetime", "dbm", "difflib", "dis", "doctest",
    "email._policybase", "email.feedparser", "email.header", "email.message",
    "email.mime.base", "email.policy", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.metadata", "importlib.util", "inspect", "io",
    "ipaddress", "json", "json.decoder", "json.encoder", "keyword", "linecache",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "modulefinder", "multiprocessing.connection", "multiprocessing.context",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.queues",
    "multiprocessing.synchronize", "netrc", "ntpath", "nturl2path", "numbers", "opcode",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pty",
    "py_compile", "pydoc", "queue", "quopri", "random", "reprlib", "rlcompleter",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "sqlite3.dump", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "token", "tokenize", "trace", "traceback", "tracemalloc", "tty", "types", "typing",
    "unittest.case", "unittest.loader", "unittest.main", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite", "urllib.error",
    "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom.expatbuilder",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp",
    "zipfile", "zipimport", "zoneinfo._zoneinfo",
)
MAX_DOC_CHARS = 1500  # longer docstrings are split into one document per paragraph
MIN_DOC_WORDS = 5


@dataclass(frozen=True)
class TextDoc:
    id: str    # "<module>:<qualname>" (+ ":<paragraph>" for split docstrings)
    text: str  # paragraphs separated by a blank line, lines within one reflowed


def stdlib_docs(modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[list[TextDoc], list[str]]:
    """(documents in module order then source order, modules whose file was not found)."""
    docs: list[TextDoc] = []
    missing: list[str] = []
    for module in modules:
        path = module_file(module)
        if path is None:
            missing.append(module)
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for qualname, docstring in _docstrings(tree, module):
            docs.extend(_documents(qualname, docstring))
    return docs, missing


def module_file(module: str) -> str | None:
    """The stdlib source file of ``module`` (plain module or package), or None."""
    base = os.path.join(sysconfig.get_paths()["stdlib"], *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _docstrings(node: ast.AST, qualname: str):
    """(qualified name, cleaned docstring) for the node and its nested defs, in source order."""
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{qualname}.{child.name}" if ":" in qualname
                                   else f"{qualname}:{child.name}")


def _documents(qualname: str, docstring: str) -> list[TextDoc]:
    """Prose paragraphs of one docstring (code examples dropped), as one or more documents."""
    paragraphs = [p for p in (_reflow(block) for block in docstring.split("\n\n")) if p]
    whole = "\n\n".join(paragraphs)
    if len(whole) <= MAX_DOC_CHARS:
        parts = [(qualname, whole)]
    else:
        parts = [(f"{qualname}:{k}", p) for k, p in enumerate(paragraphs)]
    return [TextDoc(i, t) for i, t in parts if len(t.split()) >= MIN_DOC_WORDS]


def _reflow(block: str) -> str:
    """Join a paragraph's lines; '' for code (doctest or indented) blocks."""
    lines = [line for line in block.splitlines() if line.strip()]
    if not lines or any(line.lstrip().startswith((">>>", "...")) or line.startswith(" ")
                        for line in lines):
        return ""
    return " ".join(line.strip() for line in lines)


__all__ = ["STDLIB_MODULES", "TextDoc", "stdlib_docs", "module_file"]
