"""The seed's usage examples ("基本用法", "转交人工客服") run as written against the
embedded default, modulo the import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.manager import AutoSessionManager, Priority, TaskType

ROOT = Path(__file__).resolve().parents[2]

SEED_EXAMPLE = '''
from app.manager import AutoSessionManager
from app.manager import TaskType, Priority

# 初始化管理器
manager = AutoSessionManager()

# 创建机器人会话
session = manager.create_robot_session(
    shop_id=1,
    user_id="user123",
    task_type=TaskType.CONSULTATION,
    priority=Priority.MEDIUM
)

# 处理消息
messages = [
    {
        "session_id": session.session_id,
        "user_id": "user123",
        "message_type": "text",
        "content": "你好，我需要帮助",
        "timestamp": "2024-01-01T10:00:00"
    }
]

result = manager.process_chat_messages(messages)
print(f"处理了 {result.processed_count} 条消息")

# 转交到人工客服
transfer_result = manager.transfer_to_human(
    session_id=session.session_id,
    human_user_id="agent001",
    reason="用户需要专业咨询",
    urgency=Priority.HIGH
)

print(f"转交成功: {transfer_result.transfer_id}")
print("status", manager.get_session(session.session_id).status)
'''


@pytest.mark.sqlite_only
def test_seed_examples_run_as_written_on_the_embedded_default(tmp_path):
    """A fresh process, no configuration at all but a data directory: it just works."""
    script = tmp_path / "seed_example.py"
    script.write_text(SEED_EXAMPLE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "处理了 1 条消息"
    assert lines[1].startswith("转交成功: trf_")
    assert lines[2] == "status TRANSFERRED"
    assert (tmp_path / "data" / "auto_session.sqlite3").exists()


def test_manager_drives_the_same_rules_as_the_service(runtime):
    manager = AutoSessionManager(runtime)
    robot = manager.create_robot_session(shop_id=7, user_id="u1", task_type=TaskType.NEGOTIATION)
    assert (robot.session_type, robot.priority, robot.status) == ("AUTO_BARGAIN", 3, "ACTIVE")
    human = manager.create_human_session(shop_id=7, user_id="u1", agent_id="agent-1")
    assert human.status == "ACTIVE"
    assert manager.get_session(robot.session_id).status == "PAUSED"
    result = manager.process_chat_messages([
        {"session_id": human.session_id, "sender_role": "human", "content": "您好",
         "timestamp": "2024-01-01T10:00:00", "message_id": "m-1"},
        {"session_id": human.session_id, "sender_role": "human", "content": "您好",
         "timestamp": "2024-01-01T10:00:00", "message_id": "m-1"},
        {"session_id": human.session_id, "content": "x", "timestamp": "not a time"},
    ])
    assert (result.processed_count, result.inserted, result.duplicates, result.invalid) == (
        2, 1, 1, 1)
    assert result.errors[0].line == 3 and "timestamp" in result.errors[0].error
    manager.complete_session(human.session_id)
    assert manager.get_session(robot.session_id).status == "ACTIVE"
    transfer = manager.transfer_to_human(robot.session_id, reason="退款", urgency=Priority.HIGH)
    accepted = manager.accept_transfer(transfer.transfer_id, agent_id="agent-2")
    assert accepted.status == "ACCEPTED"
    done = manager.complete_session(robot.session_id)
    assert done.status == "COMPLETED"


def test_robot_factory_refuses_a_human_type(runtime):
    manager = AutoSessionManager(runtime)
    with pytest.raises(Exception, match="not a robot type"):
        manager.create_robot_session(shop_id=1, user_id="u", session_type="MANUAL_URGENT")
