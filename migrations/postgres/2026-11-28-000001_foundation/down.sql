DROP TABLE request_log;
DROP TABLE room_notices;
DROP TABLE room_members;
DROP TABLE rooms;
DROP TABLE bot_events;
DROP TABLE processed_events;
DROP TABLE appservice_transactions;
