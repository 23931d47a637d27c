DROP INDEX room_notices_last_sent_at;
DROP INDEX budget_reservations_finished_at;
DROP INDEX bot_events_created_at;
DROP INDEX processed_events_updated_at;
DROP INDEX appservice_transactions_received_at;
DROP TABLE leases;
