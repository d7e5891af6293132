"""Host-side media inputs for the towers (numpy only): decoding, features, layout."""
