"""Weight tables, one per checkpoint component, and the generic reading, loading and writing over them.

A component's table lists, for every parameter of our module, its key relative to the component's prefix
in a transformers checkpoint (`io.layouts`) and the conversion between the two layouts. Loading and
saving go through any list of tables, so a tower adds a table, not a loader.
"""
