"""Python client of the segments service: generated stubs in `segments.v1`, typed client here."""
