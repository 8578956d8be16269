"""What the docs tests share: reading shell lines out of Markdown."""


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, at the start or after a space), and without
    trailing spaces."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()
