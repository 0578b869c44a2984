"""How an error message quotes a user's value: its repr, cut to a few hundred characters (a 5 MB string or a
100,000-digit integer is named, not echoed)."""

SHOWN_CHARS = 200


def shown(value, limit=SHOWN_CHARS):
    """repr(value), at most `limit` characters of it, with the full length named when it was cut."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (sys.set_int_max_str_digits)
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
