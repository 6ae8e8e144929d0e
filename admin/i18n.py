"""The console's two languages: English and Chinese (简体中文).

One table, key → (English, 中文). The language is the console session's choice
(`/admin/lang/<code>`), else the browser's Accept-Language, else English. Words the
page's JavaScript needs are handed to it as a JSON blob (`js_messages`).
"""

from __future__ import annotations

from flask import request, session

LANGUAGES = ("en", "zh")
DEFAULT = "en"

MESSAGES: dict[str, tuple[str, str]] = {
    "app_title": ("Auto Session console", "会话调度控制台"),
    "nav_dashboard": ("Dashboard", "仪表盘"),
    "nav_sessions": ("Sessions", "会话"),
    "nav_transfers": ("Transfer queue", "转人工队列"),
    "nav_agents": ("Agents", "客服人员"),
    "nav_imports": ("History import", "历史导入"),
    "nav_logout": ("Log out", "退出登录"),
    "language": ("Language", "语言"),
    "login_title": ("Log in with an admin token", "使用管理员令牌登录"),
    "login_token": ("Admin token", "管理员令牌"),
    "login_submit": ("Log in", "登录"),
    "login_bad_token": ("This token is not valid (unknown or revoked).",
                        "令牌无效（不存在或已吊销）。"),
    "login_not_admin": ("This token does not belong to an admin client.",
                        "该令牌不属于管理员客户端。"),
    "login_rate_limited": ("Too many failed log-ins from this address; try again later.",
                           "此地址登录失败次数过多，请稍后再试。"),
    "logged_in_as": ("Logged in as", "当前用户"),
    "dashboard": ("Dashboard", "仪表盘"),
    "sessions_total": ("Sessions", "会话总数"),
    "by_status": ("Sessions by status", "按状态统计会话"),
    "by_type": ("Sessions by type", "按类型统计会话"),
    "transfers_waiting": ("Transfers waiting", "等待中的转人工"),
    "oldest_waiting": ("Oldest waiting", "最长等待"),
    "average_waiting": ("Average wait", "平均等待"),
    "average_accept": ("Average time to accept (24 h)", "平均接入时长（24 小时）"),
    "last_24h": ("Last 24 hours", "最近 24 小时"),
    "sessions_started": ("Sessions started", "新建会话"),
    "transfers": ("Transfers", "转人工"),
    "timeouts": ("Timeouts", "超时"),
    "conflicts": ("Conflicts", "冲突"),
    "per_hour": ("per hour, last 24 hours (UTC)", "每小时，最近 24 小时（UTC）"),
    "imports_24h": ("Import throughput (24 h)", "导入吞吐（24 小时）"),
    "rows": ("rows", "行"),
    "rows_per_second": ("rows/s", "行/秒"),
    "jobs_running": ("jobs running", "进行中的任务"),
    "search": ("Search", "搜索"),
    "search_sessions": ("Search sessions", "搜索会话"),
    "account_id": ("Account", "账号"),
    "shop_id": ("Shop", "店铺"),
    "status": ("Status", "状态"),
    "session_type": ("Type", "类型"),
    "owner_id": ("Owner", "负责人"),
    "origin": ("Origin", "来源"),
    "created_from": ("Created from (UTC)", "创建时间起（UTC）"),
    "created_to": ("Created before (UTC)", "创建时间止（UTC）"),
    "any": ("any", "全部"),
    "session": ("Session", "会话"),
    "created_at": ("Created", "创建时间"),
    "priority": ("Priority", "优先级"),
    "messages": ("Messages", "消息"),
    "no_results": ("Nothing found.", "没有结果。"),
    "next_page": ("Next page", "下一页"),
    "conversation": ("Conversation", "对话内容"),
    "audit_timeline": ("Audit timeline", "审计时间线"),
    "verify_chain": ("Verify audit chain", "校验审计链"),
    "chain_intact": ("Audit chain intact", "审计链完整"),
    "chain_broken": ("Audit chain BROKEN at row", "审计链被篡改，首个异常行"),
    "rows_checked": ("rows checked", "行已校验"),
    "force_close": ("Force close", "强制关闭"),
    "force_close_confirm": ("End this session now (CANCELLED)?", "立即结束该会话（取消）？"),
    # operator corrections (SPEC §11)
    "corrections": ("Corrections (merge and split)", "人工修正（合并与拆分）"),
    "merged_into": ("Merged into", "已合并到"),
    "merged_from": ("Merged from", "合并自"),
    "split_from": ("Split from", "拆分自"),
    "split_into": ("Split into", "已拆分出"),
    "merge": ("Merge", "合并"),
    "merge_into": ("Merge this session into (session id)", "将本会话合并到（会话 ID）"),
    "merge_confirm": ("Move this session's messages and transfers into the other session?",
                      "将本会话的消息和转人工记录移入另一个会话？"),
    "split": ("Split", "拆分"),
    "split_at": ("Split before message (message id)", "从此消息之前拆分（消息 ID）"),
    "split_confirm": ("Move this message and every later one to a new session?",
                      "将该消息及之后的所有消息移到一个新会话？"),
    "corrections_help": ("Only ended sessions of one slot can be merged or split; every "
                         "correction is audited with you as the actor.",
                         "只有同一会话槽中已结束的会话可以合并或拆分；每次修正都会以您为"
                         "操作者记入审计日志。"),
    "correction_occupies": ("This session occupies the slot: it cannot be merged or split "
                            "until it ends.",
                            "该会话正在占用会话槽：结束之前不能合并或拆分。"),
    "correction_merged": ("This session was merged into another one and holds no messages.",
                          "该会话已合并到另一个会话，不再包含消息。"),
    "correction_not_ended": ("This session has not ended: only ended sessions can be "
                             "merged or split (another ended session can be merged into it).",
                             "该会话尚未结束：只有已结束的会话可以合并或拆分（可将其他已结束"
                             "的会话合并到它）。"),
    "reason": ("Reason", "原因"),
    "slot": ("Slot", "会话槽"),
    "view_slot": ("View slot", "查看会话槽"),
    "occupant": ("Occupant", "当前占用"),
    "waiting_queue": ("Waiting (precedence order)", "等待队列（按优先顺序）"),
    "paused_by_owner": ("Paused by their owner", "被负责人暂停"),
    "release_slot": ("Release slot", "释放会话槽"),
    "release_confirm": ("Cancel the occupant and promote the next waiting session?",
                        "取消当前会话并激活下一个等待的会话？"),
    "free": ("free", "空闲"),
    "transfer_queue": ("Transfer queue", "转人工队列"),
    "urgency": ("Urgency", "紧急程度"),
    "age": ("Waiting for", "已等待"),
    "agent": ("Agent", "客服"),
    "agents": ("Agents", "客服人员"),
    "presence": ("Presence", "在线状态"),
    "skills": ("Skills", "技能"),
    "load": ("Load", "当前负载"),
    "max_concurrent": ("Capacity", "最大并发"),
    "upload_title": ("Upload a chat export", "上传聊天记录"),
    "upload_help": ("JSON array, NDJSON or CSV with a header; UTF-8, UTF-8 with BOM or GBK; "
                    "optionally gzip.",
                    "支持 JSON 数组、NDJSON、带表头的 CSV；UTF-8、带 BOM 的 UTF-8 或 GBK；"
                    "可 gzip 压缩。"),
    "upload_submit": ("Upload", "上传"),
    "session_gap": ("Session gap (s)", "会话间隔（秒）"),
    "grouping": ("Grouping", "分组方式"),
    "grouping_auto": ("auto (threads, replies, then gaps)", "自动（线程、回复链，其余按间隔）"),
    "grouping_threads": ("threads only", "仅按线程"),
    "grouping_gap": ("time gaps only", "仅按时间间隔"),
    "review": ("LLM review", "LLM 复核"),
    "on": ("on", "开"),
    "off": ("off", "关"),
    "boundaries_reviewed": ("boundaries reviewed", "已复核边界"),
    "boundaries_merged": ("merged", "已合并"),
    "review_calls": ("model calls", "模型调用次数"),
    "started_by": ("Starts by", "分段依据"),
    "started_by_thread": ("thread", "线程"),
    "started_by_reply": ("reply chain", "回复链"),
    "started_by_gap": ("time gap", "时间间隔"),
    "started_by_review": ("LLM review", "LLM 复核"),
    "thread_id": ("thread", "线程"),
    "uploading": ("Uploading…", "上传中…"),
    "processing": ("Processing…", "处理中…"),
    "import_done": ("Import finished", "导入完成"),
    "row_errors": ("Row errors", "行错误"),
    "line": ("Line", "行号"),
    "error": ("Error", "错误"),
    "no_row_errors": ("No row errors.", "没有行错误。"),
    "import_jobs": ("Import jobs", "导入任务"),
    "job": ("Job", "任务"),
    "file": ("File", "文件"),
    "total_rows": ("Rows", "总行数"),
    "processed": ("Processed", "已处理"),
    "inserted": ("Inserted", "新增"),
    "duplicates": ("Duplicates", "重复"),
    "invalid": ("Invalid", "无效"),
    "sessions_created": ("Sessions created", "新建会话"),
    "sessions_updated": ("Sessions updated", "更新会话"),
    "retry": ("Retry", "重试"),
    "details": ("Details", "详情"),
    "back": ("Back", "返回"),
    "actor": ("Actor", "操作者"),
    "operation": ("Operation", "操作"),
    "time": ("Time", "时间"),
    "none": ("none", "无"),
    "error_title": ("Something went wrong", "出错了"),
    "done": ("Done.", "完成。"),
    # the live desk (SPEC §12): first response
    "being_handled": ("Being handled (accepted)", "处理中（已接入）"),
    "first_response": ("First response", "首次响应"),
    "answered": ("answered", "已响应"),
    "waiting_for": ("waiting", "已等待"),
    "first_response_overdue": ("overdue", "超时未响应"),
    "first_response_median": ("First response, median (24 h)", "首次响应中位数（24 小时）"),
    "first_response_overdue_24h": ("overdue (24 h)", "次超时未响应（24 小时）"),
    "handed_back_from": ("Handed back from", "转回自"),
    "handed_back_to": ("Handed back to the robot as", "已转回机器人会话"),
    # the live pages (static/live.js)
    "live_connecting": ("Connecting to live updates…", "正在连接实时更新…"),
    "live_on": ("Live: this page updates by itself", "实时：本页自动更新"),
    "live_reconnecting": ("Live updates interrupted, reconnecting…", "实时更新中断，正在重新连接…"),
    # Webhook redelivery (SPEC §13)
    "nav_deliveries": ("Failed webhooks", "推送失败"),
    "failed_deliveries": ("Given-up webhook deliveries", "已放弃的 Webhook 推送"),
    "failed_deliveries_hint": ("Deliveries given up after WEBHOOK_MAX_ATTEMPTS. Redeliver "
                               "sends one again with a new round of attempts (audited).",
                               "超过 WEBHOOK_MAX_ATTEMPTS 次后放弃的推送。重新推送会再次发送并"
                               "重新计算重试次数（记入审计）。"),
    "delivery": ("Delivery", "推送"),
    "client": ("Client", "客户端"),
    "event": ("Event", "事件"),
    "attempts": ("Attempts", "尝试次数"),
    "last_error": ("Last error", "最近错误"),
    "redeliver": ("Redeliver", "重新推送"),
    "redelivery_queued": ("Sent again:", "已重新推送："),
}


def current_language() -> str:
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return str(chosen)
    best = request.accept_languages.best_match(["en", "zh", "zh-CN", "zh-TW"])
    return "zh" if best and best.startswith("zh") else DEFAULT


def translate(key: str, lang: str | None = None) -> str:
    """The text of `key` in `lang` (the request's language by default); the key itself
    if it is unknown, so a missing entry shows up on the page instead of failing it."""
    pair = MESSAGES.get(key)
    if pair is None:
        return key
    return pair[1] if (lang or current_language()) == "zh" else pair[0]


def js_messages(lang: str) -> dict[str, str]:
    keys = ("uploading", "processing", "import_done", "row_errors", "line", "error",
            "no_row_errors", "chain_intact", "chain_broken", "rows_checked", "sessions_started",
            "transfers", "timeouts", "conflicts", "inserted", "duplicates", "invalid",
            "processed", "total_rows", "status")
    return {k: translate(k, lang) for k in keys}
