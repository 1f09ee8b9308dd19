from pathlib import Path

from ess_async import Manager

from .conftest import SMTPServer, make_config


async def test_smoke(tmp_path: Path, smtp_server: SMTPServer) -> None:
    m = Manager(tmp_path / "ws", config=make_config(smtp_server.port))
    await m.create_work(to="a@example.com", subject="hi", body="x")
    s = await m.process_workload()
    assert s.passed == 1
    assert smtp_server.handler.subjects() == ["hi"]
