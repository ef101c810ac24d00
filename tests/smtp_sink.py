"""A real SMTP server for the tests (aiosmtpd, pinned in .ci/run).

    python3 tests/smtp_sink.py PORT DIR [--reply "550 5.1.1 no such user"] [--tempfail N]

Saves every accepted message as DIR/<uuid>.eml (written, then renamed). With --reply,
answers every DATA with that reply instead; with --tempfail N, answers the first N with
451 and accepts the rest. Prints "ready" once it listens.
"""

import argparse
import asyncio
import os
import uuid

from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self, directory, reply, tempfail):
        self.directory = directory
        self.reply = reply
        self.tempfail = tempfail

    async def handle_DATA(self, server, session, envelope):
        if self.reply:
            return self.reply
        if self.tempfail > 0:
            self.tempfail -= 1
            return "451 4.3.0 try again later"
        name = uuid.uuid4().hex
        tmp = os.path.join(self.directory, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.directory, name + ".eml"))
        return "250 2.0.0 OK"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("dir")
    parser.add_argument("--reply")
    parser.add_argument("--tempfail", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    handler = Sink(args.dir, args.reply, args.tempfail)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", args.port
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
