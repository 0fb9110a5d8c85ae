"""``flashdreams-serve``: live streaming sessions over WebSocket, with a browser viewer.

:mod:`flashdreams.serve.engine` steps the sessions on a dedicated thread;
:mod:`flashdreams.serve.app` is the Starlette app (protocol in docs/serving.md);
:mod:`flashdreams.serve.cli` is the command.
"""
