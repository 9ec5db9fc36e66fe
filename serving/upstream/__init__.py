"""The engines as the gateway sees them: the pool of model routes and engine health, opening a
request to a healthy engine (aiohttp, fixed paths only), reading Server-Sent Events and the
usage they report, and mapping an engine's own errors without echoing its input."""
