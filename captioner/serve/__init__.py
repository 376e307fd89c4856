"""`captioner serve`: caption photos over HTTP (app.py: the routes; batching.py: the shared forward pass;
page.py: the upload page). Needs the serve extra: pip install 'captioner[serve]'."""
