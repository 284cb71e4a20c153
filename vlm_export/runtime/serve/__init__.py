"""``vlm-edge serve``: one engine, several sources, HTTP, events and metrics (extra [serve])."""
