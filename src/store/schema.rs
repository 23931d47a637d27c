//! Diesel table definitions shared by the SQLite and PostgreSQL backends.

diesel::table! {
    appservice_transactions (txn_id) {
        txn_id -> Text,
        event_count -> Integer,
        received_at -> Timestamp,
    }
}

diesel::table! {
    processed_events (event_id) {
        event_id -> Text,
        room_id -> Text,
        sender -> Text,
        kind -> Text,
        state -> Text,
        lease_owner -> Text,
        lease_expires_at -> Timestamp,
        attempts -> Integer,
        reply_event_id -> Nullable<Text>,
        origin_ts -> Timestamp,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        generation -> BigInt,
        outbox -> Nullable<Text>,
        sent_parts -> Integer,
        progress_event_id -> Nullable<Text>,
    }
}

diesel::table! {
    bot_events (event_id) {
        event_id -> Text,
        room_id -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    rooms (room_id) {
        room_id -> Text,
        is_direct -> Bool,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    room_members (room_id, user_id) {
        room_id -> Text,
        user_id -> Text,
    }
}

diesel::table! {
    room_settings (room_id) {
        room_id -> Text,
        context_mode -> Nullable<Text>,
        route -> Nullable<Text>,
        updated_by -> Text,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    room_answer_windows (room_id, window_start) {
        room_id -> Text,
        window_start -> Timestamp,
        answers -> Integer,
    }
}

diesel::table! {
    room_notices (room_id, reason) {
        room_id -> Text,
        reason -> Text,
        last_sent_at -> Timestamp,
    }
}

diesel::table! {
    request_log (id) {
        id -> Text,
        room_id -> Text,
        sender -> Text,
        route -> Text,
        router_source -> Text,
        router_confidence -> Double,
        models -> Text,
        prompt_tokens -> BigInt,
        cached_tokens -> BigInt,
        completion_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        cost_router_ticks -> BigInt,
        cost_web_ticks -> BigInt,
        cost_reason_ticks -> BigInt,
        cost_final_ticks -> BigInt,
        cost_total_ticks -> BigInt,
        cost_source -> Text,
        latency_ms -> BigInt,
        stage_ms -> Text,
        escalated -> Bool,
        fallback_fired -> Bool,
        cache_hit -> Bool,
        ceiling_hit -> Bool,
        per_user_cap_hit -> Bool,
        prompt_version -> Text,
        provider_request_id -> Text,
        degraded -> Text,
        err -> Text,
        ok -> Bool,
        query_text -> Text,
        created_at -> Timestamp,
        cost_trivial_ticks -> BigInt,
        stage_usage -> Text,
        direct_input_tokens -> BigInt,
        direct_output_tokens -> BigInt,
        images -> Integer,
    }
}

diesel::table! {
    response_cache (cache_key) {
        cache_key -> Text,
        route -> Text,
        answer -> Text,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    grounding_usage (day) {
        day -> Text,
        calls -> BigInt,
    }
}

diesel::table! {
    budget_counters (day, scope) {
        day -> Text,
        scope -> Text,
        cap_ticks -> BigInt,
        settled_ticks -> BigInt,
        reserved_ticks -> BigInt,
        requests -> BigInt,
    }
}

diesel::table! {
    budget_reservations (id) {
        id -> Text,
        day -> Text,
        user_id -> Text,
        amount_ticks -> BigInt,
        state -> Text,
        dispatched -> Bool,
        actual_ticks -> BigInt,
        created_at -> Timestamp,
        expires_at -> Timestamp,
        finished_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    crypto_devices (user_id) {
        user_id -> Text,
        device_id -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    leases (name) {
        name -> Text,
        owner -> Text,
        expires_at -> Timestamp,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    appservice_transactions,
    processed_events,
    bot_events,
    rooms,
    room_members,
    room_notices,
    request_log,
    response_cache,
    grounding_usage,
    budget_counters,
    budget_reservations,
    crypto_devices,
    leases,
    room_settings,
    room_answer_windows,
);
