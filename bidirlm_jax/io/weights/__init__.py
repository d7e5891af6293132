"""Weight tables, one per checkpoint component, and the generic reading, loading and writing over them.

A component's table lists, for every parameter of our module, its key relative to the component's prefix
in a transformers checkpoint (`io.layouts`) and the conversion between the two layouts. Loading and
saving go through any list of tables, so a tower adds a table, not a loader:

    VISUAL = Component("visual", ("model.visual.", "visual."), anchor="patch_embed.proj.weight")

    def vision_table(config) -> Table:
        return Table(VISUAL, (entry(("patch_embed", "weight"), "patch_embed.proj.weight", (d, 3, 2, 16, 16), (d, 1536)),
                              ...))

    tables = [*text_tables(text_config), vision_table(vision_config).under("visual")]
    layout = detect_layout(reader.keys(), [t.component for t in tables])        # each component's prefix
    model = load_state(abstract, reader, layout, tables, dtype="float32")      # checked, one tensor at a time
    write_tables(out, model, Layout(((TEXT, "language_model."), (VISUAL, "visual."))), tables, dtype=...)
"""
