DROP TABLE room_answer_windows;
DROP TABLE room_settings;
