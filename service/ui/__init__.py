"""The web dashboard under /ui/: server-rendered pages (templates/), one small script and stylesheet
(static/, shipped in the package: no CDN, no Node build), and browser sessions (session.py)."""
